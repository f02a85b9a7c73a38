"""VDVAE in Flax, module for module as the official PyTorch code (openai/vdvae).

Runs of identical blocks are applied with `nn.scan`, so their weights are stacked on a
leading axis under one name, `enc_blocks_{first}_{last}` or `dec_blocks_{first}_{last}`;
this keeps the jit of a 75-block decoder to seconds. Arrays are NHWC.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from vdvae_sr_jax import distributions as D
from vdvae_sr_jax import kernels
from vdvae_sr_jax.hparams import (
    Run,
    decoder_runs,
    encoder_runs,
    parse_layer_string,
    parse_width_string,
)

Array = Any


@jax.custom_jvp
def gelu(x):
    """The exact GELU as the official code computes it, x/2 (1 + erf(x/sqrt 2)), not the tanh approximation."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    """GELU'(x) = Phi(x) + x phi(x), so that the backward pass keeps one array per GELU: differentiating the formula
    keeps three, and a rolled scan stacks each of them."""
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return x * cdf, (cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))) * t


@jax.custom_vjp
def add_bias(y, bias):
    """y + bias, in y's dtype. The bias gradient sums over every position in float32: summed in bfloat16, as XLA
    does for a bfloat16 y, the biases of sr64 at width 64 came out 8.8% off float32 (median), the kernels 0.7%."""
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, dy):
    axes = tuple(range(dy.ndim - bias.ndim))
    return dy, jnp.sum(dy, axes, dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _conv(x, kernel, pad: int | None = None):
    """NHWC by HWIO, stride 1, `pad` on every side (default: 'same' for an odd kernel)."""
    pad = kernel.shape[0] // 2 if pad is None else pad
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def same_conv(x, kernel):
    """A stride-1 'same' convolution of x [N, H, W, in] by an odd (k, k, in, out) kernel. On the CPU its gradients
    are forward convolutions of transposed arrays, or matrix products for a 1x1 kernel (`_forward_conv_grads`); other
    platforms differentiate as usual."""
    return _conv(x, kernel)


@flax.struct.dataclass
class _ConvResiduals:
    """What `same_conv`'s gradients need: x for the kernel's gradient (None when the kernel is frozen), the kernel,
    and whether x's gradient is wanted (not an input image's), so that none is computed that autodiff would skip."""

    x: Array | None
    kernel: Array
    x_grad: bool = flax.struct.field(pytree_node=False)


def _same_conv_fwd(x, kernel):
    return _conv(x.value, kernel.value), _ConvResiduals(x.value if kernel.perturbed else None, kernel.value,
                                                        x.perturbed)


def _same_conv_bwd(res: _ConvResiduals, dy):
    if isinstance(dy, SymbolicZero):
        return None, None
    return jax.lax.platform_dependent(res, dy, cpu=_forward_conv_grads, default=_conv_grads)


def _conv_grads(res: _ConvResiduals, dy):
    """(dx, dkernel), None where not wanted, as JAX transposes a convolution."""
    x_like = jax.ShapeDtypeStruct(dy.shape[:-1] + res.kernel.shape[2:3], res.kernel.dtype)
    dx = jax.linear_transpose(lambda x: _conv(x, res.kernel), x_like)(dy)[0] if res.x_grad else None
    dkernel = None if res.x is None else jax.linear_transpose(lambda k: _conv(res.x, k), res.kernel)(dy)[0]
    return dx, dkernel


def _forward_conv_grads(res: _ConvResiduals, dy):
    """`_conv_grads` as NHWC-by-HWIO convolutions, the one form XLA:CPU hands its fast library (YNNPACK) inside a
    loop: it leaves the usual gradient convolutions of a rolled scan in other forms, which ran 15x slower. dkernel
    convolves x, batch and channels swapped, by dy as a window the size of the image. A 1x1 kernel's gradients are
    matrix products over the pixels, which YNNPACK runs faster than those convolutions."""
    if res.kernel.shape[0] == 1:
        dx = jnp.dot(dy, res.kernel[0, 0].T) if res.x_grad else None
        pixels = ((0, 1, 2), (0, 1, 2))
        return dx, None if res.x is None else jax.lax.dot_general(res.x, dy, (pixels, ((), ())))[None, None]
    dx = _conv(dy, jnp.flip(res.kernel, (0, 1)).swapaxes(2, 3)) if res.x_grad else None
    if res.x is None:
        return dx, None
    dkernel = _conv(res.x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pad=res.kernel.shape[0] // 2)
    return dx, dkernel.transpose(1, 2, 0, 3)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd, symbolic_zeros=True)


def conv(features: int, kernel: int, name: str | None = None, *, scale: float = 1.0, zero: bool = False,
         dtype=None, dot: bool = False):
    """A stride-1 'same' `Conv` with PyTorch's default weight init times `scale`, and zero bias."""
    init = nn.initializers.zeros if zero else nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")
    return Conv(features, kernel, init, dtype, dot, name=name)


class Conv(nn.Module):
    """A stride-1 'same' conv with nn.Conv's params, (k, k, in, out) and (out,). `dtype` casts x and the kernel; the
    bias joins by `add_bias`, keeping its gradient in float32. With `dot`, a 1x1 conv is a matrix product over
    channels, which XLA:GPU runs as a Triton or cuBLAS matmul instead of a cuDNN convolution."""

    features: int
    kernel_size: int
    kernel_init: Any
    dtype: Any = None
    dot: bool = False

    @nn.compact
    def weights(self, in_features: int):
        """The (k, k, in_features, out) kernel and (out,) bias, for products made outside (see Block, DecBlock)."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features))
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))

    def __call__(self, x):
        kernel, bias = self.weights(x.shape[-1])
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = pointwise_product(x, kernel, self.dot) if self.kernel_size == 1 else same_conv(x, kernel)
        return add_bias(y, bias)


def pointwise_product(x, kernel, dot: bool):
    """x [N, H, W, in] times a (1, 1, in, out) kernel, as a 1x1 conv or (`dot`) a matrix product over channels."""
    return jnp.dot(x, kernel[0, 0]) if dot else same_conv(x, kernel)


def gelu_product(x, weights: tuple, pointwise: str):
    """(x, (`pointwise_product(gelu(x), kernel)` for each (1, 1, in, out) kernel of `weights`)), GELU(x) read once.
    With `pointwise="pallas"`, a program compiled for a CUDA GPU runs the products as one Pallas kernel that applies
    the GELU as it loads x (`kernels.gelu_matmul`, where its tiles fit); other platforms run XLA's ops, one product
    with the kernels side by side. Use the x returned for x's other uses: the backward kernel then adds their
    gradient to the products'."""
    def xla(x, weights):
        y = pointwise_product(gelu(x), jnp.concatenate(weights, axis=3), pointwise == "dot")
        return x, tuple(jnp.split(y, np.cumsum(widths)[:-1], axis=-1))

    widths = [kernel.shape[3] for kernel in weights]
    if pointwise != "pallas" or not kernels.supports(math.prod(x.shape[:-1]), x.shape[-1], widths, x.dtype):
        return xla(x, weights)
    return jax.lax.platform_dependent(x, weights, cuda=kernels.gelu_pointwise, default=xla)


class Block(nn.Module):
    """Bottleneck block: GELU before each of c1 (1x1), c2, c3 (3x3, or 1x1 at res <= 2), c4 (1x1)."""

    middle_width: int
    out_width: int
    down_rate: int | None = None
    residual: bool = False
    use_3x3: bool = True
    zero_last: bool = False
    last_scale: float = 1.0
    dtype: Any = None
    pointwise: str = "conv"

    def setup(self):
        k = 3 if self.use_3x3 else 1
        opts = dict(dtype=self.dtype, dot=self.pointwise == "dot")
        self.c1 = conv(self.middle_width, 1, **opts)
        self.c2 = conv(self.middle_width, k, **opts)
        self.c3 = conv(self.middle_width, k, **opts)
        self.c4 = conv(self.out_width, 1, scale=self.last_scale, zero=self.zero_last, **opts)

    def __call__(self, x):
        return self.after_c1(*self.apply_c1(x))

    def apply_c1(self, x):
        """(x, c1's output); use this x for x's other uses (see gelu_product)."""
        kernel, bias = self.c1.weights(x.shape[-1])
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        x, (h,) = gelu_product(x, (kernel,), self.pointwise)
        return x, add_bias(h, bias)

    def c4_input(self, h):
        """GELU of c3's output, from c1's output h."""
        return gelu(self.c3(gelu(self.c2(gelu(h)))))

    def after_c1(self, x, h):
        """The rest of the block, from c1's output h."""
        h = self.c4(self.c4_input(h))
        out = x + h if self.residual else h
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


def _scan(fn, length: int, n_xs_broadcast: int = 0, unroll: int = 1, remat: bool = False):
    """Scans `fn(module, carry, xs, *broadcast)` over `length` blocks with stacked params.

    `unroll` > 1 unrolls that many blocks per loop iteration: a longer compile, for a faster step on a GPU, where
    XLA then fuses across blocks.
    With `remat`, each block's activations are recomputed in the backward pass instead of stored; only a rolled
    loop keeps them apart, since XLA merges the recomputation of fully unrolled blocks back into the forward pass.
    """
    return nn.scan(
        nn.remat(fn, prevent_cse=False) if remat else fn,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * n_xs_broadcast,
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
    pointwise: str = "conv"

    @nn.compact
    def __call__(self, x) -> dict[int, Array]:
        widths = parse_width_string(self.width, self.custom_width_str)
        blocks = parse_layer_string(self.enc_blocks)
        x = conv(self.width, 3, "in_conv", dtype=self.dtype)(x)
        activations = {x.shape[1]: x}
        for run in encoder_runs(blocks):
            w = widths[run.res]
            block = Block(
                int(w * self.bottleneck_multiple),
                w,
                down_rate=run.extra,
                residual=True,
                use_3x3=run.res > 2,
                last_scale=math.sqrt(1.0 / len(blocks)),
                dtype=self.dtype,
                pointwise=self.pointwise,
                name=run.name,
            )
            if run.stacked:
                x, _ = _scan(lambda m, c, _: (m(c), None), run.length, unroll=self.scan_unroll)(block, x, None)
            else:
                x = block(x)
            res = x.shape[1]
            x = pad_channels(x, widths[res])
            activations[res] = x
        return activations


class DecBlock(nn.Module):
    """Top-down block: posterior `enc`, `prior` (with a state residual), `z_proj`, `resnet`.

    With `gated`, the block owns a per-channel `gate` (zero at init) and its input state becomes
    `state + gate * cond` whenever a conditioning activation `cond` is given (VDVAE-SR).
    """

    res: int
    width: int
    zdim: int
    bottleneck_multiple: float
    n_blocks: int
    gated: bool = False
    dtype: Any = None
    pointwise: str = "conv"

    def setup(self):
        mid = int(self.width * self.bottleneck_multiple)
        scale = math.sqrt(1.0 / self.n_blocks)
        opts = dict(use_3x3=self.res > 2, dtype=self.dtype, pointwise=self.pointwise)
        self.enc = Block(mid, self.zdim * 2, **opts)
        self.prior = Block(mid, self.zdim * 2 + self.width, zero_last=True, **opts)
        self.z_proj = conv(self.width, 1, "z_proj", scale=scale, dtype=self.dtype, dot=self.pointwise == "dot")
        self.resnet = Block(mid, self.width, residual=True, last_scale=scale, **opts)
        if self.gated:
            self.gate = self.param("gate", nn.initializers.zeros, (1, 1, 1, self.width))

    def _prior_stats(self, g):
        """Prior mean and log-std (in float32, where the KL and sampling maths run) from `prior.c4`'s input g, by the
        first 2 zdim outputs of its kernel (`_finish` applies the rest)."""
        kernel, bias = self.prior.c4.weights(g.shape[-1])
        g, kernel = nn.dtypes.promote_dtype(g, kernel, dtype=self.dtype)
        n = 2 * self.zdim
        stats = pointwise_product(g, kernel[..., :n], self.pointwise == "dot").astype(jnp.float32) + bias[:n]
        return stats[..., : self.zdim], stats[..., self.zdim :]

    def _both_c1(self, x, activated_acts):
        """(x, then the outputs of enc.c1 and prior.c1), which both read GELU(x): as one product with both kernels,
        GELU(x) is read once and gets one gradient back. GELU(acts) meets the rest of enc.c1's kernel."""
        w = x.shape[-1]
        enc_kernel, enc_bias = self.enc.c1.weights(w + activated_acts.shape[-1])
        prior_kernel, prior_bias = self.prior.c1.weights(w)
        x, acts, enc_kernel, prior_kernel = nn.dtypes.promote_dtype(
            x, activated_acts, enc_kernel, prior_kernel, dtype=self.dtype)
        x, (enc_h, prior_h) = gelu_product(x, (enc_kernel[:, :, :w], prior_kernel), self.pointwise)
        enc = enc_h + pointwise_product(acts, enc_kernel[:, :, w:], self.pointwise == "dot")
        return x, add_bias(enc, enc_bias), add_bias(prior_h, prior_bias)

    def _condition(self, x, cond):
        return x if cond is None else x + (self.gate * cond).astype(x.dtype)

    def _finish(self, x, g, z, step):
        """resnet(x + the prior's state residual from `prior.c4`'s input g + z_proj(z)), and z (a given latent where
        the step has one). Both residuals come from one product over [g, z] with both kernels: XLA fuses one add
        into a cuDNN convolution, and two products would leave the other add a pass of its own over the state."""
        z = jnp.where(step["use_latent"], step["latent"].astype(z.dtype), z)
        n = 2 * self.zdim
        prior_kernel, prior_bias = self.prior.c4.weights(g.shape[-1])
        z_kernel, z_bias = self.z_proj.weights(self.zdim)
        x, g, zc, prior_kernel, z_kernel = nn.dtypes.promote_dtype(x, g, z, prior_kernel, z_kernel, dtype=self.dtype)
        residual = pointwise_product(jnp.concatenate([g, zc], axis=-1),
                                     jnp.concatenate([prior_kernel[..., n:], z_kernel], axis=2),
                                     self.pointwise == "dot")
        return self.resnet(add_bias(x + residual, prior_bias[n:] + z_bias)), z

    def posterior(self, x, step, activated_acts, cond):
        """One block of the inference pass: z ~ q(z | x, acts), given GELU(acts); returns state, (z, KL summed over
        H, W, C)."""
        x = self._condition(x, cond)
        x, enc_h, prior_h = self._both_c1(x, activated_acts)
        enc = self.enc.after_c1(x, enc_h).astype(jnp.float32)
        qm, qv = enc[..., : self.zdim], enc[..., self.zdim :]
        g = self.prior.c4_input(prior_h)
        pm, pv = self._prior_stats(g)
        z = D.gaussian_sample(qm, qv, step["eps"])
        kl = D.gaussian_kl(qm, pm, qv, pv)
        x, z = self._finish(x, g, z, step)
        return x, (z, kl.sum(axis=(1, 2, 3)))

    def generate(self, x, step, cond):
        """One block of the generative pass: z ~ p(z) at the step's temperature."""
        x = self._condition(x, cond)
        x, prior_h = self.prior.apply_c1(x)
        g = self.prior.c4_input(prior_h)
        pm, pv = self._prior_stats(g)
        z = D.gaussian_sample(pm, D.with_temperature(pv, step["t"]), step["eps"])
        x, z = self._finish(x, g, z, step)
        return x, z


def _layer_inputs(runs: Sequence[Run], n: int, zdim: int, eps, noise_rng, latents, temperature, dtype,
                  n_latents=None) -> list[dict]:
    """Stacks per-layer noise, latents (absent layers masked out) and temperatures for each run; `n_latents`
    (may be traced) keeps only the first that many of the given latents.

    Without `eps`, all layers' noise comes from one draw of `noise_rng` outside the scans: per-block draws inside
    them cost XLA:CPU a tenth of the train step's compile time in random-bit kernels."""
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
    out = []
    for run, noise in zip(runs, run_eps):
        shape = (n, run.res, run.res, zdim)
        layers = range(run.start, run.stop)
        out.append({
            "latent": jnp.stack([jnp.zeros(shape, dtype) if latents[i] is None else latents[i] for i in layers]),
            "use_latent": use[run.start : run.stop],
            "t": t[run.start : run.stop],
            "eps": noise,
        })
    return out


class DmolNet(nn.Module):
    """The 1x1 `out_conv` that maps the final state to DMoL logits."""

    num_mixtures: int
    dtype: Any = None
    pointwise: str = "conv"

    @nn.compact
    def __call__(self, px_z):
        return conv(self.num_mixtures * 10, 1, "out_conv", dtype=self.dtype, dot=self.pointwise == "dot")(px_z)


class Decoder(nn.Module):
    """Top-down decoder: `bias_xs` start states, `dec_blocks`, final `gain`/`bias`, and `out_net`."""

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
    pointwise: str = "conv"

    @nn.compact
    def __call__(self, activations, n: int, eps=None, latents=None, temperature=None, cond=None, n_latents=None):
        """Posterior pass when `activations` is given, else generation of `n` images from the prior.

        Returns (px_z, DMoL logits, per-layer z list, per-layer KL [N, n_layers] or None).
        """
        widths = parse_width_string(self.width, self.custom_width_str)
        blocks = parse_layer_string(self.dec_blocks)
        runs = decoder_runs(blocks)
        dtype = self.dtype or jnp.float32
        resolutions = sorted({res for res, _ in blocks})
        xs = {
            res: jnp.broadcast_to(
                self.param(f"bias_xs_{j}", nn.initializers.zeros, (1, res, res, widths[res])),
                (n, res, res, widths[res]),
            ).astype(dtype)
            for j, res in enumerate(r for r in resolutions if r <= self.no_bias_above)
        }
        cond = cond or {}
        if activations is not None:  # each block's posterior sees GELU(acts): computed once per resolution
            activations = {res: gelu(a.astype(dtype)) for res, a in activations.items() if res in resolutions}
        noise_rng = self.make_rng("sample") if eps is None else None
        steps = _layer_inputs(runs, n, self.zdim, eps, noise_rng, latents, temperature, dtype, n_latents)
        zs, kls = [], []
        for run, step in zip(runs, steps):
            w = widths[run.res]
            x = xs.get(run.res, jnp.zeros((n, run.res, run.res, w), dtype))
            if run.extra is not None:
                up = run.res // run.extra
                x = x + jnp.repeat(jnp.repeat(xs[run.extra][..., :w], up, axis=1), up, axis=2)
            block = DecBlock(
                run.res, w, self.zdim, self.bottleneck_multiple, len(blocks), gated=self.gated, dtype=self.dtype,
                pointwise=self.pointwise, name=run.name,
            )
            c = cond.get(run.res)
            if c is not None and c.shape[-1] != w:
                raise ValueError(
                    f"conditioning activation at {run.res}x{run.res} has {c.shape[-1]} channels, the decoder "
                    f"state there has {w}: the LR encoder's widths must match the HR decoder's"
                )
            if activations is not None:
                body = lambda m, x, s, a, c: m.posterior(x, s, a, c)  # noqa: E731
                scan = _scan(body, run.length, 2, self.scan_unroll, self.remat)
                x, (z, kl) = scan(block, x, step, activations[run.res], c)
                kls.append(kl)
            else:
                body = lambda m, x, s, c: m.generate(x, s, c)  # noqa: E731
                x, z = _scan(body, run.length, 1, self.scan_unroll, self.remat)(block, x, step, c)
            zs += list(z)
            xs[run.res] = x
        gain = self.param("gain", nn.initializers.ones, (1, 1, 1, self.width))
        bias = self.param("bias", nn.initializers.zeros, (1, 1, 1, self.width))
        px_z = xs[self.image_size] * gain + bias
        logits = DmolNet(self.num_mixtures, self.dtype, self.pointwise, name="out_net")(px_z)
        kl = jnp.concatenate(kls, axis=0).T if kls else None
        return px_z, logits, zs, kl


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
    pointwise: str = "conv"
    gated: ClassVar[bool] = False

    def setup(self):
        self.encoder = Encoder(
            self.width, self.enc_blocks, self.custom_width_str, self.bottleneck_multiple, self.scan_unroll, self.dtype,
            self.pointwise,
        )
        self.decoder = Decoder(
            self.width, self.zdim, self.dec_blocks, self.image_size, self.num_mixtures, self.custom_width_str,
            self.bottleneck_multiple, self.no_bias_above, self.gated, self.scan_unroll, self.remat, self.dtype,
            self.pointwise,
        )

    @property
    def n_layers(self) -> int:
        return len(parse_layer_string(self.dec_blocks))

    def encode(self, x) -> dict[int, Array]:
        """Bottom-up activations per resolution for normalised images x [N, H, W, C]."""
        return self.encoder(x)

    def __call__(self, x, target, eps=None, latents=None):
        """Posterior pass: ELBO (a loss, nats/dim), distortion and rate [N], per-layer KL [N, L] and z.

        `eps` (one array per layer) replaces the standard-normal noise; `latents` (a list, shorter
        than the layer count or with None entries to leave layers sampled) replaces z itself.
        """
        return self._elbo(self.encoder(x), target, eps, latents, cond=None)

    def _elbo(self, activations, target, eps, latents, cond):
        n = target.shape[0]
        px_z, logits, zs, kl = self.decoder(activations, n, eps=eps, latents=latents, cond=cond)
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
        px_z, logits, _, _ = self.decoder(None, n, eps=eps, latents=latents, temperature=temperature,
                                          n_latents=n_latents)
        return px_z, logits

    def sample(self, n: int, temperature=None, latents=None, n_latents=None):
        """Images [n, H, W, 3] in [-1, 1] drawn from the prior and the DMoL (needs a 'sample' rng)."""
        _, logits = self.generate(n, temperature, latents, n_latents=n_latents)
        return D.dmol_sample(self.make_rng("sample"), logits.astype(jnp.float32))


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
            self.lr_width, self.lr_enc_blocks, self.lr_custom_width_str, self.bottleneck_multiple, self.scan_unroll,
            self.dtype, self.pointwise,
        )

    def encode_lr(self, x_lr) -> dict[int, Array]:
        """LR-encoder activations per resolution for normalised LR images."""
        return self.lr_encoder(x_lr)

    def __call__(self, x, target, x_lr, eps=None, latents=None):
        """Conditional posterior pass: the ELBO with KL(q(z | x, y) || p(z | y)), as `VDVAE.__call__`."""
        return self._elbo(self.encoder(x), target, eps, latents, cond=self.lr_encoder(x_lr))

    def generate(self, x_lr, temperature=None, latents=None, eps=None):
        """Conditional generation from p(z | y): (px_z, DMoL logits) for each LR image."""
        cond = self.lr_encoder(x_lr)
        px_z, logits, _, _ = self.decoder(None, x_lr.shape[0], eps=eps, latents=latents, temperature=temperature,
                                          cond=cond)
        return px_z, logits

    def sample(self, x_lr, temperature=None, latents=None):
        """SR images [N, H, W, 3] in [-1, 1] drawn from p(z | y) and the DMoL (needs a 'sample' rng)."""
        _, logits = self.generate(x_lr, temperature, latents)
        return D.dmol_sample(self.make_rng("sample"), logits.astype(jnp.float32))


def model_from_hparams(hparams: Mapping[str, Any], **overrides) -> VDVAE:
    """A VDVAE, or a VDVAESR if `lr_enc_blocks` is set, from official hyperparameter names."""
    hparams = {**hparams, **overrides}
    cls = VDVAESR if hparams.get("lr_enc_blocks") else VDVAE
    names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    return cls(**{k: v for k, v in hparams.items() if k in names})


POINTWISE = ("conv", "dot", "pallas")  # how 1x1 convs run: see configs/common.py


def model_from_config(config) -> VDVAE:
    """The VDVAE a config file describes, with its compute dtype, scan unrolling, rematerialisation and 1x1 convs."""
    if config.pointwise not in POINTWISE:
        raise ValueError(f"config.pointwise is {config.pointwise!r}; it must be one of {', '.join(POINTWISE)}")
    if config.pointwise == "pallas" and jnp.dtype(config.compute_dtype) not in kernels.DTYPES:
        logging.warning("config.pointwise='pallas' has kernels for bfloat16 and float16 only; compute_dtype=%s runs "
                        "XLA's ops", config.compute_dtype)
    return model_from_hparams(config.model, dtype=jnp.dtype(config.compute_dtype), scan_unroll=config.scan_unroll,
                              remat=config.remat, pointwise=config.pointwise)


def init_params(model: VDVAE, rng=None):
    """Freshly initialised params (official init) of a VDVAE; jitted with rolled scans, which give the same params.

    The init draws with the non-partitionable threefry: it runs once and unsharded, and XLA:CPU compiles it 2-4x
    faster (a tiny VDVAE-SR: 15 s instead of 34 s)."""
    rng = jax.random.key(0) if rng is None else rng
    x = jnp.zeros((1, model.image_size, model.image_size, 3))
    inputs = (x, x)
    if isinstance(model, VDVAESR):
        inputs += (jnp.zeros((1, model.lr_image_size, model.lr_image_size, 3)),)
    rolled = model.clone(scan_unroll=1)
    with jax.threefry_partitionable(False):
        return jax.jit(lambda r: rolled.init({"params": r, "sample": r}, *inputs)["params"])(rng)
