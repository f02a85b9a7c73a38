"""VDVAE (Child 2020) and VDVAE-SR in Flax, module for module as the official PyTorch `vae.py`.

Runs of identical blocks are applied with `nn.scan`, so their weights are stacked on a leading axis under one
name, `enc_blocks_{first}_{last}` or `dec_blocks_{first}_{last}`; this keeps the jit of a 75-block decoder to
seconds. Arrays are NHWC. The layers, and their speed choices, are in `layers.py`; opt-in variants of a block
with the same params are in `variants.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdvae_sr_jax import distributions as D
from vdvae_sr_jax.hparams import Run, decoder_runs, encoder_runs, parse_layer_string, parse_width_string
from vdvae_sr_jax.layers import concatenate, gelu, get_1x1, get_3x3

Array = Any
DECODINGS = ("sample", "mean")  # how `sample` turns DMoL logits into pixels: see VDVAE.pixels


class Block(nn.Module):
    """Bottleneck block: GELU before each of c1 (1x1), c2, c3 (3x3, or 1x1 at res <= 2) and c4 (1x1), an optional
    residual, an optional average-pool down."""

    middle_width: int
    out_width: int
    down_rate: int | None = None
    residual: bool = False
    use_3x3: bool = True
    zero_last: bool = False
    last_scale: float = 1.0
    dtype: Any = None

    def setup(self):
        mid_conv = get_3x3 if self.use_3x3 else get_1x1
        self.c1 = get_1x1(self.middle_width, dtype=self.dtype)
        self.c2 = mid_conv(self.middle_width, dtype=self.dtype)
        self.c3 = mid_conv(self.middle_width, dtype=self.dtype)
        self.c4 = get_1x1(self.out_width, zero_weights=self.zero_last, scale=self.last_scale, dtype=self.dtype)

    def __call__(self, x):
        xhat = self.c1(gelu(x))
        return self.finish(x, xhat)

    def finish(self, x, xhat):
        """c2, c3, c4, the residual and the pool, from c1's output `xhat`."""
        xhat = self.c2(gelu(xhat))
        xhat = self.c3(gelu(xhat))
        xhat = self.c4(gelu(xhat))
        out = x + xhat if self.residual else xhat
        if self.down_rate is not None:
            out = nn.avg_pool(out, (self.down_rate, self.down_rate), (self.down_rate, self.down_rate))
        return out


def pad_channels(x, width: int):
    """Zero-pads the channel axis up to `width`, where the encoder widens."""
    if x.shape[-1] == width:
        return x
    if x.shape[-1] > width:
        raise ValueError(f"cannot pad {x.shape[-1]} channels down to {width}: widths may only grow toward 1x1")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])))


def scan_blocks(fn, *, length: int, n_broadcast: int = 0, unroll: int = 1, remat: bool = False):
    """Scans `fn(block, carry, xs, *broadcast)` over `length` blocks whose params are stacked on axis 0.

    `unroll` > 1 unrolls that many blocks per loop step (a longer compile; XLA can fuse across blocks). With
    `remat`, each block's activations are recomputed in the backward pass instead of stored.
    """
    return nn.scan(
        nn.remat(fn, prevent_cse=False) if remat else fn,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * n_broadcast,
        length=length,
        unroll=unroll,
    )


class Encoder(nn.Module):
    """Bottom-up encoder: `in_conv`, then `enc_blocks`; returns {resolution: last activation there}."""

    width: int
    enc_blocks: str
    custom_width_str: str = ""
    bottleneck_multiple: float = 0.25
    scan_unroll: int = 1
    dtype: Any = None
    block: type[Block] = Block

    @nn.compact
    def __call__(self, x) -> dict[int, Array]:
        widths = parse_width_string(self.width, self.custom_width_str)
        blocks = parse_layer_string(self.enc_blocks)
        x = get_3x3(self.width, dtype=self.dtype, name="in_conv")(x)
        activations = {x.shape[1]: x}
        for run in encoder_runs(blocks):
            w = widths[run.res]
            block = self.block(
                middle_width=int(w * self.bottleneck_multiple),
                out_width=w,
                down_rate=run.extra,
                residual=True,
                use_3x3=run.res > 2,
                last_scale=math.sqrt(1.0 / len(blocks)),
                dtype=self.dtype,
                name=run.name,
            )
            if run.stacked:
                scan = scan_blocks(lambda b, x, _: (b(x), None), length=run.length, unroll=self.scan_unroll)
                x, _ = scan(block, x, None)
            else:
                x = block(x)
            res = x.shape[1]
            x = pad_channels(x, widths[res])
            activations[res] = x
        return activations


class DecBlock(nn.Module):
    """Top-down block: posterior `enc`, `prior` (which also emits a residual for the state), `z_proj`, `resnet`.

    With `gated` (VDVAE-SR), the block owns a per-channel `gate`, zero at init, and its input state becomes
    `state + gate * cond` where the LR encoder has an activation `cond` at this resolution.
    """

    res: int
    width: int
    zdim: int
    bottleneck_multiple: float
    n_blocks: int
    gated: bool = False
    dtype: Any = None
    block: type[Block] = Block

    def setup(self):
        cond_width = int(self.width * self.bottleneck_multiple)
        use_3x3 = self.res > 2
        scale = math.sqrt(1.0 / self.n_blocks)
        self.enc = self.block(cond_width, self.zdim * 2, use_3x3=use_3x3, dtype=self.dtype)
        self.prior = self.block(cond_width, self.zdim * 2 + self.width, use_3x3=use_3x3, zero_last=True,
                                dtype=self.dtype)
        self.z_proj = get_1x1(self.width, scale=scale, dtype=self.dtype)
        self.resnet = self.block(cond_width, self.width, residual=True, use_3x3=use_3x3, last_scale=scale,
                                 dtype=self.dtype)
        if self.gated:
            self.gate = self.param("gate", nn.initializers.zeros, (1, 1, 1, self.width))

    def prior_feats(self, x):
        """The prior's mean and log-std (float32, where the KL and sampling maths run) and its state residual."""
        feats = self.prior(x)
        pm, pv = jnp.split(feats[..., : 2 * self.zdim].astype(jnp.float32), 2, axis=-1)
        return pm, pv, feats[..., 2 * self.zdim :]

    def sample(self, x, acts, eps):
        """z ~ q(z | x, acts) given the noise, the state with the prior's residual, and KL(q || p)."""
        qm, qv = jnp.split(self.enc(concatenate([x, acts])).astype(jnp.float32), 2, axis=-1)
        pm, pv, xpp = self.prior_feats(x)
        x = x + xpp
        z = D.gaussian_sample(qm, qv, eps)
        kl = D.gaussian_kl(qm, pm, qv, pv)
        return z, x, kl

    def sample_uncond(self, x, eps, t):
        """z ~ p(z) at temperature t given the noise, and the state with the prior's residual."""
        pm, pv, xpp = self.prior_feats(x)
        x = x + xpp
        z = D.gaussian_sample(pm, D.with_temperature(pv, t), eps)
        return z, x

    def forward(self, x, step, acts, cond):
        """One block of the inference pass: (state, (z, KL summed over H, W and C))."""
        if cond is not None:
            x = x + (self.gate * cond).astype(x.dtype)
        z, x, kl = self.sample(x, acts, step["eps"])
        z = jnp.where(step["use_latent"], step["latent"].astype(z.dtype), z)
        x = x + self.z_proj(z)
        x = self.resnet(x)
        return x, (z, kl.sum(axis=(1, 2, 3)))

    def forward_uncond(self, x, step, cond):
        """One block of the generative pass: (state, z), z drawn from the prior or given by the step."""
        if cond is not None:
            x = x + (self.gate * cond).astype(x.dtype)
        z, x = self.sample_uncond(x, step["eps"], step["t"])
        z = jnp.where(step["use_latent"], step["latent"].astype(z.dtype), z)
        x = x + self.z_proj(z)
        x = self.resnet(x)
        return x, z


def layer_inputs(runs: Sequence[Run], *, n: int, zdim: int, eps, noise_rng, latents, temperature, dtype,
                 n_latents=None) -> list[dict]:
    """Per run, the stacked per-layer noise `eps`, latents `latent` (with `use_latent`, False where absent) and
    temperatures `t`. `n_latents` (may be traced) keeps only the first that many of the given latents.

    Without `eps`, every layer's noise comes from one draw of `noise_rng` outside the scans: per-block draws inside
    them make XLA:CPU compile many random-bit kernels."""
    n_layers = runs[-1].stop
    latents = list(latents or [])
    if len(latents) > n_layers:
        raise ValueError(f"got latents for {len(latents)} layers, the decoder has {n_layers}")
    if eps is not None and len(eps) != n_layers:
        raise ValueError(f"got noise for {len(eps)} layers, the decoder has {n_layers}")
    t = jnp.asarray(1.0 if temperature is None else temperature, jnp.float32)
    if t.shape not in ((), (1,), (n_layers,)):
        raise ValueError(f"temperature must be one number or one per layer ({n_layers}), got shape {t.shape}")
    t = jnp.broadcast_to(t, (n_layers,))
    latents += [None] * (n_layers - len(latents))
    use = jnp.asarray([z is not None for z in latents])
    if n_latents is not None:
        use = use & (jnp.arange(n_layers) < n_latents)
    if eps is None:
        sizes = [run.length * n * run.res**2 * zdim for run in runs]
        flat = jnp.split(jax.random.normal(noise_rng, (sum(sizes),)), np.cumsum(sizes)[:-1])
        run_eps = [f.reshape(run.length, n, run.res, run.res, zdim) for run, f in zip(runs, flat)]
    else:
        run_eps = [jnp.stack(eps[run.start : run.stop]) for run in runs]
    steps = []
    for run, noise in zip(runs, run_eps):
        shape = (n, run.res, run.res, zdim)
        layers = range(run.start, run.stop)
        steps.append({
            "latent": jnp.stack([jnp.zeros(shape, dtype) if latents[i] is None else latents[i] for i in layers]),
            "use_latent": use[run.start : run.stop],
            "t": t[run.start : run.stop],
            "eps": noise,
        })
    return steps


class DmolNet(nn.Module):
    """The 1x1 `out_conv` that maps the final state to DMoL logits."""

    num_mixtures: int
    dtype: Any = None

    @nn.compact
    def __call__(self, px_z):
        return get_1x1(self.num_mixtures * 10, dtype=self.dtype, name="out_conv")(px_z)


class Decoder(nn.Module):
    """Top-down decoder: `bias_xs` start states, `dec_blocks`, the final `gain` and `bias`, and `out_net`.

    `forward` is the inference pass (from the encoder's activations), `forward_uncond` the generative pass; both
    take latents to inject and VDVAE-SR's conditioning `cond`, {resolution: LR activation}.
    """

    width: int
    zdim: int
    dec_blocks: str
    image_size: int
    num_mixtures: int
    custom_width_str: str = ""
    bottleneck_multiple: float = 0.25
    no_bias_above: int = 64
    gated: bool = False
    scan_unroll: int = 1
    remat: bool = False
    dtype: Any = None
    block: type[Block] = Block

    def setup(self):
        blocks = parse_layer_string(self.dec_blocks)
        self.runs = decoder_runs(blocks)
        resolutions = sorted({res for res, _ in blocks})
        widths = parse_width_string(self.width, self.custom_width_str)
        self.widths = {res: widths[res] for res in resolutions}
        self.bias_xs = {
            res: self.param(f"bias_xs_{j}", nn.initializers.zeros, (1, res, res, self.widths[res]))
            for j, res in enumerate(r for r in resolutions if r <= self.no_bias_above)
        }
        self.blocks = [
            DecBlock(
                res=run.res, width=self.widths[run.res], zdim=self.zdim, bottleneck_multiple=self.bottleneck_multiple,
                n_blocks=len(blocks), gated=self.gated, dtype=self.dtype, block=self.block, name=run.name,
            )
            for run in self.runs
        ]
        self.gain = self.param("gain", nn.initializers.ones, (1, 1, 1, self.width))
        self.bias = self.param("bias", nn.initializers.zeros, (1, 1, 1, self.width))
        self.out_net = DmolNet(self.num_mixtures, dtype=self.dtype)

    def forward(self, activations, *, eps=None, latents=None, cond=None):
        """Inference pass: (px_z, DMoL logits, per-layer z list, per-layer KL [N, n_layers])."""
        acts = {res: a.astype(self.dtype or jnp.float32) for res, a in activations.items()}
        n = next(iter(acts.values())).shape[0]
        steps = self._steps(n, eps, latents, None, None)
        body = lambda block, x, step, acts, cond: block.forward(x, step, acts, cond)  # noqa: E731
        xs, outs = self._top_down(n, body, steps, cond, lambda run: (acts[run.res],))
        px_z, logits = self._output(xs)
        zs = [z for run_zs, _ in outs for z in run_zs]
        return px_z, logits, zs, jnp.concatenate([kl for _, kl in outs], axis=0).T

    def forward_uncond(self, n: int, *, temperature=None, latents=None, eps=None, n_latents=None, cond=None):
        """Generative pass of `n` images from the prior at a temperature: (px_z, DMoL logits). Of `latents`, the
        first `n_latents` layers (may be traced) are injected if that is given."""
        steps = self._steps(n, eps, latents, temperature, n_latents)
        body = lambda block, x, step, cond: block.forward_uncond(x, step, cond)  # noqa: E731
        xs, _ = self._top_down(n, body, steps, cond, lambda run: ())
        return self._output(xs)

    def _steps(self, n, eps, latents, temperature, n_latents):
        noise_rng = self.make_rng("sample") if eps is None else None
        return layer_inputs(self.runs, n=n, zdim=self.zdim, eps=eps, noise_rng=noise_rng, latents=latents,
                            temperature=temperature, dtype=self.dtype or jnp.float32, n_latents=n_latents)

    def _top_down(self, n, body, steps, cond, run_inputs):
        """Runs the blocks from the start states: ({resolution: state}, each run's stacked outputs)."""
        dtype = self.dtype or jnp.float32
        xs = {res: jnp.broadcast_to(b, (n,) + b.shape[1:]).astype(dtype) for res, b in self.bias_xs.items()}
        cond = cond or {}
        outs = []
        for run, block, step in zip(self.runs, self.blocks, steps):
            w = self.widths[run.res]
            x = xs.get(run.res, jnp.zeros((n, run.res, run.res, w), dtype))
            if run.extra is not None:  # the mixin: the state upsampled from a lower resolution
                up = run.res // run.extra
                x = x + jnp.repeat(jnp.repeat(xs[run.extra][..., :w], up, axis=1), up, axis=2)
            c = cond.get(run.res)
            if c is not None and c.shape[-1] != w:
                raise ValueError(
                    f"conditioning activation at {run.res}x{run.res} has {c.shape[-1]} channels, the decoder "
                    f"state there has {w}: the LR encoder's widths must match the HR decoder's"
                )
            inputs = run_inputs(run)
            scan = scan_blocks(body, length=run.length, n_broadcast=len(inputs) + 1, unroll=self.scan_unroll,
                               remat=self.remat)
            x, out = scan(block, x, step, *inputs, c)
            outs.append(out)
            xs[run.res] = x
        return xs, outs

    def _output(self, xs):
        px_z = xs[self.image_size] * self.gain + self.bias
        return px_z, self.out_net(px_z)


class VDVAE(nn.Module):
    """The official VAE: `encoder` and `decoder`, with the ELBO in nats per dimension."""

    width: int
    zdim: int
    enc_blocks: str
    dec_blocks: str
    image_size: int
    num_mixtures: int
    custom_width_str: str = ""
    bottleneck_multiple: float = 0.25
    no_bias_above: int = 64
    low_bit: bool = False
    scan_unroll: int = 1
    remat: bool = False
    dtype: Any = None
    block: type[Block] = Block
    gated: ClassVar[bool] = False

    def setup(self):
        self.encoder = Encoder(
            width=self.width, enc_blocks=self.enc_blocks, custom_width_str=self.custom_width_str,
            bottleneck_multiple=self.bottleneck_multiple, scan_unroll=self.scan_unroll, dtype=self.dtype,
            block=self.block,
        )
        self.decoder = Decoder(
            width=self.width, zdim=self.zdim, dec_blocks=self.dec_blocks, image_size=self.image_size,
            num_mixtures=self.num_mixtures, custom_width_str=self.custom_width_str,
            bottleneck_multiple=self.bottleneck_multiple, no_bias_above=self.no_bias_above, gated=self.gated,
            scan_unroll=self.scan_unroll, remat=self.remat, dtype=self.dtype, block=self.block,
        )

    @property
    def n_layers(self) -> int:
        return len(parse_layer_string(self.dec_blocks))

    def encode(self, x) -> dict[int, Array]:
        """Bottom-up activations per resolution for normalised images x [N, H, W, C]."""
        return self.encoder(x)

    def __call__(self, x, target, eps=None, latents=None):
        """Inference pass: ELBO (a loss, nats/dim), distortion and rate [N], per-layer KL [N, L] and z.

        `eps` (one array per layer) replaces the standard-normal noise; `latents` (a list, shorter than the layer
        count or with None entries to leave layers sampled) replaces z itself.
        """
        return self.elbo(self.encoder(x), target, eps=eps, latents=latents, cond=None)

    def elbo(self, activations, target, *, eps, latents, cond):
        px_z, logits, zs, kl = self.decoder.forward(activations, eps=eps, latents=latents, cond=cond)
        distortion = D.dmol_nll(target, logits.astype(jnp.float32), self.low_bit)
        rate = kl.sum(axis=1) / np.prod(target.shape[1:])
        return {
            "elbo": (distortion + rate).mean(),
            "distortion": distortion,
            "rate": rate,
            "kl": kl,
            "z": zs,
            "px_z": px_z,
            "logits": logits,
        }

    def generate(self, n: int, temperature=None, latents=None, eps=None, n_latents=None):
        """Generative pass from the prior: (px_z, DMoL logits) for `n` images at a temperature; of `latents`,
        only the first `n_latents` layers (may be traced) are used if given."""
        return self.decoder.forward_uncond(n, temperature=temperature, latents=latents, eps=eps,
                                           n_latents=n_latents)

    def sample(self, n: int, temperature=None, latents=None, n_latents=None, decode: str = "sample"):
        """Images [n, H, W, 3] in [-1, 1] from the prior, their pixels decoded by `decode` (needs a 'sample' rng)."""
        _, logits = self.generate(n, temperature, latents, n_latents=n_latents)
        return self.pixels(logits.astype(jnp.float32), decode)

    def pixels(self, logits, decode: str):
        """Images in [-1, 1] from DMoL logits: 'sample' draws each pixel as upstream does (a 'sample' rng);
        'mean' takes the mixture's expected value, deterministic and free of per-pixel noise."""
        if decode == "sample":
            return D.dmol_sample(self.make_rng("sample"), logits)
        if decode == "mean":
            return D.dmol_mean(logits)
        raise ValueError(f"unknown pixel decoding {decode!r}: use one of {DECODINGS}")


class VDVAESR(VDVAE):
    """VDVAE-SR: the HR VDVAE plus an `lr_encoder` whose activation at each resolution r, times a per-block,
    per-channel `gate` (zero at init), is added to the input state of every decoder block at r."""

    lr_image_size: int = 0
    lr_enc_blocks: str = ""
    lr_width: int = 0
    lr_custom_width_str: str = ""
    gated: ClassVar[bool] = True

    def setup(self):
        super().setup()
        if not (self.lr_image_size and self.lr_enc_blocks and self.lr_width):
            raise ValueError("VDVAESR needs lr_image_size, lr_enc_blocks and lr_width for its LR encoder")
        self.lr_encoder = Encoder(
            width=self.lr_width, enc_blocks=self.lr_enc_blocks, custom_width_str=self.lr_custom_width_str,
            bottleneck_multiple=self.bottleneck_multiple, scan_unroll=self.scan_unroll, dtype=self.dtype,
            block=self.block,
        )

    def encode_lr(self, x_lr) -> dict[int, Array]:
        """LR-encoder activations per resolution for normalised LR images."""
        return self.lr_encoder(x_lr)

    def __call__(self, x, target, x_lr, eps=None, latents=None):
        """Conditional inference pass: the ELBO with KL(q(z | x, y) || p(z | y)), as `VDVAE.__call__`."""
        return self.elbo(self.encoder(x), target, eps=eps, latents=latents, cond=self.lr_encoder(x_lr))

    def generate(self, x_lr, temperature=None, latents=None, eps=None):
        """Conditional generation from p(z | y): (px_z, DMoL logits) for each LR image."""
        return self.decoder.forward_uncond(x_lr.shape[0], temperature=temperature, latents=latents, eps=eps,
                                           cond=self.lr_encoder(x_lr))

    def sample(self, x_lr, temperature=None, latents=None, decode: str = "sample"):
        """SR images [N, H, W, 3] in [-1, 1] from p(z | y), their pixels decoded by `decode` (needs a 'sample'
        rng)."""
        _, logits = self.generate(x_lr, temperature, latents)
        return self.pixels(logits.astype(jnp.float32), decode)


def model_from_hparams(hparams: Mapping[str, Any], **overrides) -> VDVAE:
    """A VDVAE, or a VDVAESR if `lr_enc_blocks` is set, from official hyperparameter names."""
    hparams = {**hparams, **overrides}
    cls = VDVAESR if hparams.get("lr_enc_blocks") else VDVAE
    names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    return cls(**{k: v for k, v in hparams.items() if k in names})


def model_from_config(config) -> VDVAE:
    """The VDVAE a config file describes, with its compute dtype, scan unrolling, rematerialisation and variant."""
    from vdvae_sr_jax import variants  # the variants build on this module's Block

    return model_from_hparams(config.model, dtype=jnp.dtype(config.compute_dtype), scan_unroll=config.scan_unroll,
                              remat=config.remat, block=variants.block_for(config))


def init_params(model: VDVAE, rng=None):
    """Freshly initialised params (official init) of a VDVAE; jitted with rolled scans, which give the same params.

    The init draws with the non-partitionable threefry: it runs once and unsharded, and XLA:CPU compiles it
    several times faster."""
    rng = jax.random.key(0) if rng is None else rng
    x = jnp.zeros((1, model.image_size, model.image_size, 3))
    inputs = (x, x)
    if isinstance(model, VDVAESR):
        inputs += (jnp.zeros((1, model.lr_image_size, model.lr_image_size, 3)),)
    rolled = model.clone(scan_unroll=1)
    with jax.threefry_partitionable(False):
        return jax.jit(lambda r: rolled.init({"params": r, "sample": r}, *inputs)["params"])(rng)
