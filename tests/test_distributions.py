"""The pure maths against independent computations: Monte-Carlo KL, exhaustive DMoL sums, sampling histograms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import trapezoid
from scipy.special import expit, logsumexp
from scipy.stats import logistic

from vdvae_sr_jax import distributions as D


def test_gaussian_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu1, mu2, ls1, ls2 = rng.normal(size=4) * [1.0, 1.0, 0.5, 0.5]
    x = mu1 + np.exp(ls1) * rng.standard_normal(2_000_000)
    log_q = -0.5 * ((x - mu1) / np.exp(ls1)) ** 2 - ls1
    log_p = -0.5 * ((x - mu2) / np.exp(ls2)) ** 2 - ls2
    mc = np.mean(log_q - log_p)
    stderr = np.std(log_q - log_p) / np.sqrt(x.size)
    analytic = float(D.gaussian_kl(mu1, mu2, ls1, ls2))
    assert abs(analytic - mc) < 4 * stderr
    assert float(D.gaussian_kl(mu1, mu1, ls1, ls1)) == pytest.approx(0.0, abs=1e-7)


def test_gaussian_sample_and_temperature():
    eps = jax.random.normal(jax.random.key(0), (400_000,))
    mu, logsigma = 1.5, np.log(0.7)
    for t in (1.0, 0.5):
        z = np.asarray(D.gaussian_sample(mu, D.with_temperature(logsigma, t), eps))
        assert z.mean() == pytest.approx(mu, abs=0.01)
        assert z.std() == pytest.approx(0.7 * t, rel=0.01)
    assert np.all(np.asarray(D.gaussian_sample(mu, D.with_temperature(logsigma, 0.0), eps)) == mu)


def _random_logits(key, shape, nr_mix):
    """Logits with spread means and scales, so bins at the edges and in the middle both matter."""
    logits = jax.random.normal(key, shape + (10 * nr_mix,))
    return logits.at[..., nr_mix:].multiply(0.6)


@pytest.mark.parametrize("low_bit,levels", [(False, 256), (True, 32)])
def test_dmol_probabilities_sum_to_one_over_all_values(low_bit, levels):
    """Sums p(r, g, b) over every colour triple: the autoregressive mixture is a normalised distribution."""
    nr_mix = 3
    logits = _random_logits(jax.random.key(1), (1, 1, 1), nr_mix)
    values = jnp.linspace(-1.0, 1.0, levels)
    g, b = jnp.meshgrid(values, values, indexing="ij")

    def total_for_red(r):
        x = jnp.stack([jnp.full_like(g, r), g, b], axis=-1)[None]  # [1, levels, levels, 3]
        lp = D.dmol_log_probs(x, jnp.broadcast_to(logits, (1, levels, levels, 10 * nr_mix)), low_bit)
        return jnp.exp(lp).sum()

    total = float(jax.lax.map(total_for_red, values).sum())
    assert total == pytest.approx(1.0, abs=2e-3)


def _reference_log_prob(x, logits, nr_mix, half_bin):
    """A plain float64 DMoL likelihood for one pixel, written from the model's definition."""
    pi = logits[:nr_mix] - logsumexp(logits[:nr_mix])
    p = logits[nr_mix:].reshape(3, 3 * nr_mix)
    m, s, c = p[:, :nr_mix], np.exp(np.maximum(p[:, nr_mix:2 * nr_mix], -7)), np.tanh(p[:, 2 * nr_mix:])
    means = np.stack([m[0], m[1] + c[0] * x[0], m[2] + c[1] * x[0] + c[2] * x[1]])
    upper = np.where(x[:, None] > 0.999, 1.0, expit((x[:, None] + half_bin - means) / s))
    lower = np.where(x[:, None] < -0.999, 0.0, expit((x[:, None] - half_bin - means) / s))
    return logsumexp(pi + np.log(upper - lower).sum(0))


@pytest.mark.parametrize("low_bit", [False, True])
def test_dmol_log_probs_match_plain_computation(low_bit):
    nr_mix, levels = 4, (32 if low_bit else 256)
    rng = np.random.default_rng(3)
    logits = np.asarray(_random_logits(jax.random.key(2), (1, 8, 8), nr_mix), np.float64)
    x = (rng.integers(0, levels, size=(1, 8, 8, 3)) / (levels - 1) * 2 - 1).astype(np.float64)
    x[0, 0, 0] = [-1.0, 1.0, -1.0]  # the edge bins
    ours = np.asarray(D.dmol_log_probs(jnp.asarray(x, jnp.float32), jnp.asarray(logits, jnp.float32), low_bit))
    half_bin = 1 / 31 if low_bit else 1 / 255
    ref = np.array([[_reference_log_prob(x[0, i, j], logits[0, i, j], nr_mix, half_bin) for j in range(8)]
                    for i in range(8)])
    np.testing.assert_allclose(ours[0], ref, rtol=1e-4, atol=1e-4)
    nll = float(D.dmol_nll(jnp.asarray(x, jnp.float32), jnp.asarray(logits, jnp.float32), low_bit)[0])
    assert nll == pytest.approx(-ref.sum() / x[0].size, rel=1e-5)


def test_dmol_sample_histogram_matches_probabilities():
    """The red channel's sample histogram against its exact marginal (a mixture of binned logistics)."""
    nr_mix, n = 2, 1_000_000
    logits = np.asarray(_random_logits(jax.random.key(4), (), nr_mix), np.float64)
    tiled = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (1, 1000, n // 1000, 10 * nr_mix))
    red = np.asarray(D.dmol_sample(jax.random.key(5), tiled)[..., 0]).ravel()
    counts = np.bincount(np.rint((red + 1) * 127.5).astype(int), minlength=256) / n
    pi = np.exp(logits[:nr_mix] - logsumexp(logits[:nr_mix]))
    p = logits[nr_mix:].reshape(3, 3 * nr_mix)
    m, s = p[0, :nr_mix], np.exp(np.maximum(p[0, nr_mix:2 * nr_mix], -7))
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1, [np.inf]])
    cdf = expit((edges[:, None] - m) / s) @ pi
    assert 0.5 * np.abs(counts - np.diff(cdf)).sum() < 0.01


def _plain_dmol_mean(logits, nr_mix):
    """dmol_mean transcribed with loops, the clipped logistic's mean by numerical integration of its density."""
    grid = np.linspace(-60, 60, 600_001)

    def clipped_mean(loc, scale):
        return trapezoid(np.clip(grid, -1, 1) * logistic.pdf(grid, loc, scale), grid)

    out = np.zeros(logits.shape[:-1] + (3,))
    for idx in np.ndindex(logits.shape[:-1]):
        pi = np.exp(logits[idx][:nr_mix] - logsumexp(logits[idx][:nr_mix]))
        p = logits[idx][nr_mix:].reshape(3, 3 * nr_mix)
        mu, scale, c = p[:, :nr_mix], np.exp(np.maximum(p[:, nr_mix : 2 * nr_mix], -7.0)), np.tanh(p[:, 2 * nr_mix :])
        for k in range(nr_mix):
            r = clipped_mean(mu[0, k], scale[0, k])
            g = clipped_mean(mu[1, k] + c[0, k] * r, scale[1, k])
            b = clipped_mean(mu[2, k] + c[1, k] * r + c[2, k] * g, scale[2, k])
            out[idx] += pi[k] * np.array([r, g, b])
    return out


@pytest.mark.parametrize("saturated", [False, True])
def test_dmol_mean_matches_a_plain_transcription_and_the_mean_of_samples(saturated):
    """Away from the edges every channel equals the samples' mean; with means beyond +-1 (white and black areas),
    red, whose mean is exact, still does, where clipping the unclipped mean would not."""
    nr_mix = 4
    logits = np.asarray(_random_logits(jax.random.key(3), (2, 3), nr_mix), np.float64)
    params = logits[..., nr_mix:].reshape(2, 3, 3, 3 * nr_mix)  # a view: per channel, means, log-scales, coeffs
    if saturated:
        params[..., 0, :nr_mix] = np.linspace(0.8, 1.6, nr_mix)  # red components around and past white
        params[..., 0, nr_mix : 2 * nr_mix] = -1.5
    else:
        params[..., :nr_mix] *= 0.3  # means and scales well inside (-1, 1)
        params[..., nr_mix : 2 * nr_mix] = -3.0
    mean = np.asarray(D.dmol_mean(jnp.asarray(logits, jnp.float32)))
    np.testing.assert_allclose(mean, _plain_dmol_mean(logits, nr_mix), atol=2e-5)
    keys = jax.random.split(jax.random.key(4), 20_000)
    draws = np.asarray(jax.vmap(lambda k: D.dmol_sample(k, jnp.asarray(logits[None], jnp.float32))[0])(keys))
    channels = slice(0, 1) if saturated else slice(None)
    np.testing.assert_allclose(draws.mean(0)[..., channels], mean[..., channels], atol=0.01)
    if saturated:  # the old closed form, the clipped mean of the unclipped components, misses by far more
        mu = params[..., 0, :nr_mix]
        pi = np.exp(logits[..., :nr_mix] - logsumexp(logits[..., :nr_mix], axis=-1, keepdims=True))
        assert np.abs(np.clip((pi * mu).sum(-1), -1, 1) - draws.mean(0)[..., 0]).max() > 0.05


def test_means_round_to_the_nearest_level_where_draws_truncate():
    centres = jnp.asarray(2 * np.arange(256) / 255 - 1, jnp.float32)  # the exact value of each 8-bit level
    np.testing.assert_array_equal(np.asarray(D.mean_to_uint8(centres)), np.arange(256))
    assert (np.asarray(D.to_uint8(centres)) != np.arange(256)).sum() > 50  # truncation loses many a level
    np.testing.assert_array_equal(np.asarray(D.pixels_to_uint8(centres, "mean")), np.arange(256))
    np.testing.assert_array_equal(np.asarray(D.pixels_to_uint8(centres, "sample")), np.asarray(D.to_uint8(centres)))


def test_to_uint8_truncates_like_official():
    assert np.asarray(D.to_uint8(jnp.array([-1.0, 0.0, 1.0, 2.0]))).tolist() == [0, 127, 255, 255]
