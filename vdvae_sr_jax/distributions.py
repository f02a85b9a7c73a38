"""Diagonal Gaussians and the discretized mixture of logistics, as pure functions.

Gaussians use the official log-standard-deviation parameterisation. DMoL logits use the
official channel layout: `nr_mix` mixture logits, then for each of the 3 colour channels
`nr_mix` means, `nr_mix` log-scales and `nr_mix` autoregressive coefficients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kl(mu1, mu2, logsigma1, logsigma2):
    """Elementwise KL(N(mu1, sigma1^2) || N(mu2, sigma2^2))."""
    return (
        -0.5
        + logsigma2
        - logsigma1
        + 0.5 * (jnp.exp(2.0 * logsigma1) + (mu1 - mu2) ** 2) * jnp.exp(-2.0 * logsigma2)
    )


def gaussian_sample(mu, logsigma, eps):
    """Reparameterised sample mu + sigma * eps, for standard-normal `eps`."""
    return mu + jnp.exp(logsigma) * eps


def with_temperature(logsigma, temperature):
    """Scales the standard deviation by `temperature` (log-std + log t); t = 0 gives the mean."""
    return logsigma + jnp.log(temperature)


def _split_dmol(logits, nr_mix):
    """Splits [..., 10*nr_mix] logits into mixture logits, means, log-scales and coefficients."""
    mix_logits = logits[..., :nr_mix]
    params = logits[..., nr_mix:].reshape(logits.shape[:-1] + (3, 3 * nr_mix))
    means = params[..., :nr_mix]
    log_scales = jnp.maximum(params[..., nr_mix : 2 * nr_mix], -7.0)
    coeffs = jnp.tanh(params[..., 2 * nr_mix : 3 * nr_mix])
    return mix_logits, means, log_scales, coeffs


def dmol_log_probs(x, logits, low_bit: bool = False):
    """Log-probability [N, H, W] of each pixel's RGB value `x` in [-1, 1] (8-bit, or 5-bit if low_bit)."""
    nr_mix = logits.shape[-1] // 10
    mix_logits, means, log_scales, coeffs = _split_dmol(logits, nr_mix)
    x = x[..., None]  # [N, H, W, 3, 1] against [N, H, W, 3, nr_mix]
    m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
    m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
    means = jnp.stack([means[..., 0, :], m2, m3], axis=-2)
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    half_bin = 1.0 / 31.0 if low_bit else 1.0 / 255.0
    plus_in = inv_std * (centered + half_bin)
    min_in = inv_std * (centered - half_bin)
    cdf_delta = jax.nn.sigmoid(plus_in) - jax.nn.sigmoid(min_in)
    log_cdf_plus = plus_in - jax.nn.softplus(plus_in)
    log_one_minus_cdf_min = -jax.nn.softplus(min_in)
    mid_in = inv_std * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * jax.nn.softplus(mid_in)
    log_bins = np.log(15.5) if low_bit else np.log(127.5)
    log_probs = jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(
            x > 0.999,
            log_one_minus_cdf_min,
            jnp.where(
                cdf_delta > 1e-5,
                jnp.log(jnp.maximum(cdf_delta, 1e-12)),
                log_pdf_mid - log_bins,
            ),
        ),
    )
    log_probs = log_probs.sum(axis=-2) + jax.nn.log_softmax(mix_logits, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=-1)


def dmol_nll(x, logits, low_bit: bool = False):
    """Negative log-likelihood [N] of images `x` in [-1, 1], in nats per dimension."""
    return -dmol_log_probs(x, logits, low_bit).sum(axis=(1, 2)) / np.prod(x.shape[1:])


def dmol_sample(key, logits):
    """Draws images [N, H, W, 3] in [-1, 1] from DMoL logits (Gumbel-max mixture choice)."""
    nr_mix = logits.shape[-1] // 10
    mix_logits, means, log_scales, coeffs = _split_dmol(logits, nr_mix)
    k_mix, k_logistic = jax.random.split(key)
    u_mix = jax.random.uniform(k_mix, mix_logits.shape, minval=1e-5, maxval=1.0 - 1e-5)
    choice = jnp.argmax(mix_logits - jnp.log(-jnp.log(u_mix)), axis=-1)
    sel = jax.nn.one_hot(choice, nr_mix, dtype=logits.dtype)[..., None, :]
    means = (means * sel).sum(-1)
    log_scales = jnp.maximum((log_scales * sel).sum(-1), -7.0)
    coeffs = (coeffs * sel).sum(-1)
    u = jax.random.uniform(k_logistic, means.shape, minval=1e-5, maxval=1.0 - 1e-5)
    x = means + jnp.exp(log_scales) * (jnp.log(u) - jnp.log1p(-u))
    x0 = jnp.clip(x[..., 0], -1.0, 1.0)
    x1 = jnp.clip(x[..., 1] + coeffs[..., 0] * x0, -1.0, 1.0)
    x2 = jnp.clip(x[..., 2] + coeffs[..., 1] * x0 + coeffs[..., 2] * x1, -1.0, 1.0)
    return jnp.stack([x0, x1, x2], axis=-1)


def clipped_logistic_mean(loc, log_scale, low: float = -1.0, high: float = 1.0):
    """E[clip(X, low, high)] for X logistic with location `loc` and scale exp(`log_scale`), in closed form:
    low + s * (softplus((loc - low) / s) - softplus((loc - high) / s))."""
    s = jnp.exp(log_scale)
    return low + s * (jax.nn.softplus((loc - low) / s) - jax.nn.softplus((loc - high) / s))


def dmol_mean(logits):
    """The mixture's expected image [N, H, W, 3] in [-1, 1], weighted by the mixture probabilities: per component,
    red is the exact mean of its clipped logistic; green and blue chain the means before them through the channel
    coefficients, as sampling chains the draws (exact where those channels do not saturate). Deterministic and
    differentiable."""
    nr_mix = logits.shape[-1] // 10
    mix_logits, means, log_scales, coeffs = _split_dmol(logits, nr_mix)
    m0 = clipped_logistic_mean(means[..., 0, :], log_scales[..., 0, :])
    m1 = clipped_logistic_mean(means[..., 1, :] + coeffs[..., 0, :] * m0, log_scales[..., 1, :])
    m2 = clipped_logistic_mean(means[..., 2, :] + coeffs[..., 1, :] * m0 + coeffs[..., 2, :] * m1,
                               log_scales[..., 2, :])
    weights = jax.nn.softmax(mix_logits, axis=-1)[..., None, :]
    return (jnp.stack([m0, m1, m2], axis=-2) * weights).sum(-1)


def mean_to_uint8(x):
    """Maps a deterministic image in [-1, 1] (the DMoL mean) to the nearest uint8 levels: truncating it, as the
    official sampler does its draws, would bias it half a level low."""
    return jnp.clip(jnp.rint((x + 1.0) * 127.5), 0.0, 255.0).astype(jnp.uint8)


def pixels_to_uint8(x, decode: str):
    """uint8 images from decoded pixels: draws truncated as upstream, means rounded."""
    return mean_to_uint8(x) if decode == "mean" else to_uint8(x)


def to_uint8(x):
    """Maps images in [-1, 1] to uint8 pixels as the official sampler does ((x + 1) * 127.5, truncated)."""
    return jnp.clip((x + 1.0) * 127.5, 0.0, 255.0).astype(jnp.uint8)
