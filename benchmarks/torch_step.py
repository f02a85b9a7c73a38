"""A PyTorch VDVAE and its training step, timed on the CPU beside ours as a stand-in for the official PyTorch code.

Its modules carry the official state_dict names, and tests/test_torch_step.py checks it against the official
fixtures. A VDVAE-SR config is timed as its unconditional HR VDVAE (no LR encoder or gates).

    python -m benchmarks.torch_step --config=configs/vdvae_imagenet64.py --batch_size=1 --steps=5 --warmup=2
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags
from torch import nn

from vdvae_sr_jax.data import normalize
from vdvae_sr_jax.hparams import parse_layer_string, parse_width_string


def conv(in_dim: int, out_dim: int, kernel_size: int, *, zero_weights: bool = False, scale: float = 1.0) -> nn.Conv2d:
    """A 'same' conv initialised as ours: PyTorch's default weights times `scale` (or zero), zero bias."""
    c = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        c.weight.mul_(0.0 if zero_weights else scale)
        c.bias.zero_()
    return c


class Block(nn.Module):
    """Bottleneck block: GELU before each of c1 (1x1), c2, c3 (3x3, or 1x1 at res <= 2) and c4 (1x1), an optional
    residual, an optional average-pool down."""

    def __init__(self, in_width: int, middle_width: int, out_width: int, *, down_rate: int | None = None,
                 residual: bool = False, use_3x3: bool = True, zero_last: bool = False, last_scale: float = 1.0):
        super().__init__()
        k = 3 if use_3x3 else 1
        self.down_rate, self.residual = down_rate, residual
        self.c1 = conv(in_width, middle_width, 1)
        self.c2 = conv(middle_width, middle_width, k)
        self.c3 = conv(middle_width, middle_width, k)
        self.c4 = conv(middle_width, out_width, 1, zero_weights=zero_last, scale=last_scale)

    def forward(self, x):
        xhat = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        out = x + xhat if self.residual else xhat
        return F.avg_pool2d(out, self.down_rate) if self.down_rate is not None else out


def pad_channels(x, width: int):
    """Zero-pads the channel axis (NCHW) up to `width`, where the encoder widens."""
    return F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])) if x.shape[1] < width else x


class Encoder(nn.Module):
    """Bottom-up encoder: `in_conv`, then `enc_blocks`; returns {resolution: last activation there}."""

    def __init__(self, width: int, enc_blocks: str, custom_width_str: str, bottleneck_multiple: float):
        super().__init__()
        self.widths = parse_width_string(width, custom_width_str)
        blocks = parse_layer_string(enc_blocks)
        self.in_conv = conv(3, width, 3)
        self.enc_blocks = nn.ModuleList(
            Block(self.widths[res], int(self.widths[res] * bottleneck_multiple), self.widths[res], down_rate=down,
                  residual=True, use_3x3=res > 2, last_scale=math.sqrt(1.0 / len(blocks)))
            for res, down in blocks
        )

    def forward(self, x) -> dict[int, torch.Tensor]:
        x = self.in_conv(x)
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            x = pad_channels(x, self.widths[x.shape[2]])
            activations[x.shape[2]] = x
        return activations


class DecBlock(nn.Module):
    """Top-down block: posterior `enc`, `prior` (which also emits a residual for the state), `z_proj`, `resnet`."""

    def __init__(self, res: int, mixin: int | None, width: int, zdim: int, bottleneck_multiple: float, n_blocks: int):
        super().__init__()
        self.res, self.mixin, self.zdim = res, mixin, zdim
        cond_width = int(width * bottleneck_multiple)
        use_3x3 = res > 2
        scale = math.sqrt(1.0 / n_blocks)
        self.enc = Block(width * 2, cond_width, zdim * 2, use_3x3=use_3x3)
        self.prior = Block(width, cond_width, zdim * 2 + width, use_3x3=use_3x3, zero_last=True)
        self.z_proj = conv(zdim, width, 1, scale=scale)
        self.resnet = Block(width, cond_width, width, residual=True, use_3x3=use_3x3, last_scale=scale)

    def forward(self, x, acts, eps):
        """(new state, z, KL [N] summed over C, H and W) given the state, the encoder's activation and the noise."""
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        feats = self.prior(x)
        pm, pv, xpp = feats[:, : self.zdim], feats[:, self.zdim : 2 * self.zdim], feats[:, 2 * self.zdim :]
        x = x + xpp
        z = gaussian_sample(qm, qv, eps)
        kl = gaussian_kl(qm, pm, qv, pv).sum(dim=(1, 2, 3))
        return self.resnet(x + self.z_proj(z)), z, kl


class DmolNet(nn.Module):
    """The 1x1 `out_conv` that maps the final state to DMoL logits."""

    def __init__(self, width: int, num_mixtures: int):
        super().__init__()
        self.out_conv = conv(width, num_mixtures * 10, 1)

    def forward(self, px_z):
        return self.out_conv(px_z)


class Decoder(nn.Module):
    """Top-down decoder: `bias_xs` start states, `dec_blocks`, the final `gain` and `bias`, and `out_net`."""

    def __init__(self, width: int, zdim: int, dec_blocks: str, image_size: int, num_mixtures: int,
                 custom_width_str: str, bottleneck_multiple: float, no_bias_above: int):
        super().__init__()
        blocks = parse_layer_string(dec_blocks)
        widths = parse_width_string(width, custom_width_str)
        self.image_size, self.zdim = image_size, zdim
        self.widths = {res: widths[res] for res, _ in blocks}
        self.dec_blocks = nn.ModuleList(
            DecBlock(res, mixin, widths[res], zdim, bottleneck_multiple, len(blocks)) for res, mixin in blocks
        )
        self.bias_resolutions = [res for res in sorted(self.widths) if res <= no_bias_above]
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, widths[res], res, res)) for res in self.bias_resolutions
        )
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.out_net = DmolNet(width, num_mixtures)

    def forward(self, activations, eps=None):
        """(px_z, DMoL logits NCHW, per-layer z list, per-layer KL [N, n_layers]); `eps` (NCHW, one per layer)
        replaces the standard-normal noise."""
        n = next(iter(activations.values())).shape[0]
        xs = {res: b.expand(n, -1, -1, -1) for res, b in zip(self.bias_resolutions, self.bias_xs)}
        zs, kls = [], []
        for i, block in enumerate(self.dec_blocks):
            res, w = block.res, self.widths[block.res]
            x = xs.get(res, activations[res].new_zeros(n, w, res, res))
            if block.mixin is not None:  # the mixin: the state upsampled from a lower resolution
                up = res // block.mixin
                x = x + xs[block.mixin][:, :w].repeat_interleave(up, dim=2).repeat_interleave(up, dim=3)
            noise = torch.randn(n, self.zdim, res, res, dtype=x.dtype) if eps is None else eps[i]
            x, z, kl = block(x, activations[res], noise)
            xs[res] = x
            zs.append(z)
            kls.append(kl)
        px_z = xs[self.image_size] * self.gain + self.bias
        return px_z, self.out_net(px_z), zs, torch.stack(kls, dim=1)


class VDVAE(nn.Module):
    """The official VAE: `encoder` and `decoder`, with the ELBO in nats per dimension."""

    def __init__(self, width: int, zdim: int, enc_blocks: str, dec_blocks: str, image_size: int, num_mixtures: int,
                 custom_width_str: str = "", bottleneck_multiple: float = 0.25, no_bias_above: int = 64,
                 low_bit: bool = False):
        super().__init__()
        self.low_bit = low_bit
        self.encoder = Encoder(width, enc_blocks, custom_width_str, bottleneck_multiple)
        self.decoder = Decoder(width, zdim, dec_blocks, image_size, num_mixtures, custom_width_str,
                               bottleneck_multiple, no_bias_above)

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> VDVAE:
        """A VDVAE from official hyperparameter names (a config's `model`, or a fixture's hparams.json)."""
        names = set(inspect.signature(cls).parameters)
        return cls(**{k: v for k, v in hparams.items() if k in names})

    def forward(self, x, target, eps=None) -> dict:
        """Inference pass of x (NCHW) against `target` in [-1, 1] (NHWC or NCHW): ELBO (a loss), distortion and
        rate [N], per-layer KL [N, L], z, px_z (NCHW) and DMoL logits (NHWC, the official channel order)."""
        if target.shape[1:] == x.shape[1:]:
            target = target.permute(0, 2, 3, 1)
        px_z, logits, zs, kl = self.decoder(self.encoder(x), eps)
        logits = logits.permute(0, 2, 3, 1)
        distortion = dmol_nll(target, logits, self.low_bit)
        rate = kl.sum(dim=1) / target[0].numel()
        return {"elbo": (distortion + rate).mean(), "distortion": distortion, "rate": rate, "kl": kl, "z": zs,
                "px_z": px_z, "logits": logits}


def gaussian_kl(mu1, mu2, logsigma1, logsigma2):
    """Elementwise KL(N(mu1, sigma1^2) || N(mu2, sigma2^2)), as distributions.gaussian_kl."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (torch.exp(2.0 * logsigma1) + (mu1 - mu2) ** 2) * torch.exp(
        -2.0 * logsigma2)


def gaussian_sample(mu, logsigma, eps):
    """Reparameterised sample mu + sigma * eps."""
    return mu + torch.exp(logsigma) * eps


def dmol_log_probs(x, logits, low_bit: bool = False):
    """Log-probability [N, H, W] of each pixel `x` [N, H, W, 3] under NHWC DMoL logits, as
    distributions.dmol_log_probs."""
    nr_mix = logits.shape[-1] // 10
    mix_logits = logits[..., :nr_mix]
    params = logits[..., nr_mix:].reshape(logits.shape[:-1] + (3, 3 * nr_mix))
    means = params[..., :nr_mix]
    log_scales = params[..., nr_mix : 2 * nr_mix].clamp(min=-7.0)
    coeffs = torch.tanh(params[..., 2 * nr_mix : 3 * nr_mix])
    x = x[..., None]
    m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
    m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
    means = torch.stack([means[..., 0, :], m2, m3], dim=-2)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    half_bin = 1.0 / 31.0 if low_bit else 1.0 / 255.0
    plus_in = inv_std * (centered + half_bin)
    min_in = inv_std * (centered - half_bin)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    mid_in = inv_std * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_bins = math.log(15.5) if low_bit else math.log(127.5)
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999,
            log_one_minus_cdf_min,
            torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - log_bins),
        ),
    )
    log_probs = log_probs.sum(dim=-2) + F.log_softmax(mix_logits, dim=-1)
    return torch.logsumexp(log_probs, dim=-1)


def dmol_nll(x, logits, low_bit: bool = False):
    """Negative log-likelihood [N] of images `x` [N, H, W, 3] in [-1, 1], in nats per dimension."""
    return -dmol_log_probs(x, logits, low_bit).sum(dim=(1, 2)) / x[0].numel()


class Trainer:
    """The official update: AdamW after global-norm clipping, skipped when the norm is at or above
    `skip_threshold` (-1 disables) or the loss or norm is not finite, and an EMA of the params after each update."""

    def __init__(self, model: VDVAE, train):
        self.model, self.train = model, train
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                           eps=train.adam_eps, weight_decay=train.wd)

    def step(self, x, target) -> dict:
        """One training step on a batch: the loss, the pre-clip gradient norm and whether the update was skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(x, target)["elbo"]
        loss.backward()
        loss = loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip).item()
        skip = not (math.isfinite(loss) and math.isfinite(grad_norm)) or 0 <= self.train.skip_threshold <= grad_norm
        if not skip:
            self.optimizer.step()
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.mul_(self.train.ema_rate).add_(p, alpha=1.0 - self.train.ema_rate)
        return {"loss": loss, "grad_norm": grad_norm, "skipped": skip}


def random_batch(config, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input NCHW, target NHWC) of random uint8 images, normalised as the data pipeline does."""
    size = config.model.image_size
    images = np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, 3), np.uint8)
    inp, target = normalize(images, config.data, config.model.low_bit)
    return torch.from_numpy(inp).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(target)


def time_steps(config, batch_size: int, steps: int, warmup: int) -> dict:
    """Times `steps` training steps of a freshly initialised model after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = VDVAE.from_hparams(config.model)
    trainer = Trainer(model, config.train)
    x, target = random_batch(config, batch_size)
    for _ in range(warmup):
        trainer.step(x, target)
    times, skipped = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        skipped += trainer.step(x, target)["skipped"]
        times.append(time.perf_counter() - start)
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps": steps,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "skipped": skipped,
        "params": sum(p.numel() for p in trainer.params),
    }


def markdown(report: dict) -> str:
    """The report as one Markdown line."""
    return (f"**PyTorch {report['torch_version']}** ({report['threads']} threads), batch {report['batch_size']}: "
            f"{report['step_s_median']:.4f} s/step median (min {report['step_s_min']:.4f}, max "
            f"{report['step_s_max']:.4f}, {report['steps']} steps), {report['params']:,} params")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    report = time_steps(f.config, f.batch_size, f.steps, f.warmup)
    print(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    # Defined here, not on import: benchmarks.benchmark defines `config`, `steps` and `warmup` too, and the test
    # process imports both modules.
    config_flags.DEFINE_config_file("config", None, "A VDVAE or VDVAE-SR config file.")
    flags.DEFINE_integer("batch_size", 1, "Images per step.")
    flags.DEFINE_integer("steps", 10, "Timed steps; their median is reported.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
    flags.mark_flag_as_required("config")
    app.run(main)
