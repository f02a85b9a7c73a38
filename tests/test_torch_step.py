"""The PyTorch stand-in for the official step: number-for-number parity with the official fixtures, the update rule
(clipping, skipping, EMA) and the timing report on a tiny config."""

import numpy as np
import pytest
from conftest import assert_close, load_reference, reference_dir

torch = pytest.importorskip("torch")

from benchmarks.torch_step import VDVAE, Trainer, markdown, time_steps  # noqa: E402
from configs.vdvae_cifar10 import get_config  # noqa: E402

TINY_MODEL = {"width": 8, "zdim": 2, "image_size": 8, "num_mixtures": 2, "enc_blocks": "8x1,8d2,4x1,4d4,1x1",
              "dec_blocks": "1x1,4m1,8m4,8x1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the suite's workers share the cores, and contended OpenMP threads spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _fixture_model(name: str):
    hparams, ref = load_reference(name)
    model = VDVAE.from_hparams(hparams)
    model.load_state_dict(torch.load(reference_dir(name) / "model.th"), strict=True)
    return model, hparams, ref


@pytest.mark.parametrize("name", ["vdvae_tiny", "vdvae_custom"])
def test_posterior_pass_matches_official(name):
    model, hparams, ref = _fixture_model(name)
    assert sum(p.numel() for p in model.parameters()) == hparams["n_params"]
    eps = [_nchw(ref[f"eps_{i:03d}"]) for i in range(hparams["n_layers"])]
    with torch.no_grad():
        out = model(_nchw(ref["input"]), torch.from_numpy(ref["target"]), eps)
    for i in range(hparams["n_layers"]):
        assert_close(out["z"][i].permute(0, 2, 3, 1), ref[f"z_{i:03d}"], 1e-5, f"z_{i}")
    assert_close(out["px_z"].permute(0, 2, 3, 1), ref["px_z"], 1e-4, "px_z")
    assert_close(out["logits"], ref["dmol_logits"], 1e-4, "dmol_logits")
    for key in ("elbo", "distortion", "rate", "kl"):
        assert_close(out[key], ref[key], 1e-4, key)
    with torch.no_grad():  # an NCHW target gives the same ELBO
        nchw = model(_nchw(ref["input"]), _nchw(ref["target"]), eps)["elbo"]
    assert float(nchw) == pytest.approx(float(out["elbo"]), rel=1e-6)


def _train_config(**overrides):
    config = get_config()
    config.train.update(overrides)
    return config


def test_step_updates_params_and_ema():
    model, _, ref = _fixture_model("vdvae_tiny")
    train = _train_config(skip_threshold=-1.0, ema_rate=0.9).train
    trainer = Trainer(model, train)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        train.lr, (train.adam_beta1, train.adam_beta2), train.adam_eps, train.wd)
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.step(_nchw(ref["input"]), torch.from_numpy(ref["target"]))
    assert not result["skipped"] and np.isfinite(result["loss"]) and result["grad_norm"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))
    for b, p, e in zip(before, trainer.params, trainer.ema):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_step_at_or_above_skip_threshold_changes_nothing():
    model, _, ref = _fixture_model("vdvae_tiny")
    trainer = Trainer(model, _train_config(skip_threshold=0.0).train)
    before = [p.detach().clone() for p in trainer.params]
    assert trainer.step(_nchw(ref["input"]), torch.from_numpy(ref["target"]))["skipped"]
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params))
    assert all(torch.equal(b, e) for b, e in zip(before, trainer.ema))
    assert not any(trainer.optimizer.state.values())


def test_timing_report_on_a_tiny_config():
    config = get_config()
    config.model.update(TINY_MODEL)
    report = time_steps(config, batch_size=2, steps=2, warmup=1)
    assert report["batch_size"] == 2 and report["steps"] == 2 and report["skipped"] == 0
    assert report["threads"] == torch.get_num_threads() and report["torch_version"] == torch.__version__
    assert 0 < report["step_s_min"] <= report["step_s_median"] <= report["step_s_max"]
    assert report["params"] == sum(p.numel() for p in VDVAE.from_hparams(config.model).parameters())
    line = markdown(report)
    assert "\n" not in line and "batch 2" in line and f"{report['params']:,} params" in line
