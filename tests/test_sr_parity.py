"""VDVAE-SR against the thesis code on the sr_tiny fixture: LR activations, KL, ELBO, conditional generation."""

import flax
import jax
import numpy as np
import pytest
from conftest import assert_close, assert_posterior_matches, load_reference, reference_dir

from vdvae_sr_jax.convert import convert_sr_checkpoints
from vdvae_sr_jax.model import VDVAESR, model_from_hparams


def sr_model_from_fixture(hparams):
    lr = hparams["lr"]
    return model_from_hparams(hparams["hr"], lr_image_size=lr["image_size"], lr_enc_blocks=lr["enc_blocks"],
                              lr_width=lr["width"], lr_custom_width_str=lr["custom_width_str"])


@pytest.fixture(scope="module")
def case():
    hparams, ref = load_reference("sr_tiny")
    model = sr_model_from_fixture(hparams)
    path = reference_dir("sr_tiny")
    params = convert_sr_checkpoints(model, path / "hr_model.th", path / "lr_model.th")
    return model, params, hparams, ref


def test_lr_activations(case):
    model, params, _, ref = case
    acts = model.apply({"params": params}, ref["lr_input"], method=VDVAESR.encode_lr)
    assert sorted(acts) == [1, 4, 8, 16]
    for res, act in acts.items():
        assert_close(act, ref[f"lr_act_{res}"], 1e-5, f"lr_act_{res}")


def test_conditional_posterior_pass(case):
    model, params, hparams, ref = case
    n_layers = hparams["n_layers"]
    eps = [ref[f"eps_{i:03d}"] for i in range(n_layers)]
    out = model.apply({"params": params}, ref["hr_input"], ref["target"], ref["lr_input"], eps=eps)
    assert_posterior_matches(out, ref, n_layers)


def test_conditional_generation_with_latents(case):
    model, params, hparams, ref = case
    latents = [ref[f"z_{i:03d}"] for i in range(hparams["n_layers"])]
    px_z, logits = model.apply({"params": params}, ref["lr_input"], latents=latents, method=VDVAESR.generate,
                               rngs={"sample": jax.random.key(0)})
    assert_close(px_z, ref["prior_px_z"], 1e-4, "prior_px_z")
    assert_close(logits, ref["prior_dmol_logits"], 1e-4, "prior_dmol_logits")


def test_zero_gates_reproduce_the_unconditional_model(case):
    """With every gate at zero (the thesis init) the LR image has no effect: step 0 is the pretrained model."""
    model, params, hparams, ref = case
    flat = flax.traverse_util.flatten_dict(params)
    zeroed = flax.traverse_util.unflatten_dict(
        {path: np.zeros_like(x) if path[-1] == "gate" else x for path, x in flat.items()})
    hr_only = flax.traverse_util.unflatten_dict(
        {path: x for path, x in flat.items() if path[-1] != "gate" and path[0] != "lr_encoder"})
    eps = [ref[f"eps_{i:03d}"] for i in range(hparams["n_layers"])]
    cond = model.apply({"params": zeroed}, ref["hr_input"], ref["target"], ref["lr_input"], eps=eps)
    uncond = model_from_hparams(hparams["hr"]).apply({"params": hr_only}, ref["hr_input"], ref["target"], eps=eps)
    np.testing.assert_array_equal(np.asarray(cond["elbo"]), np.asarray(uncond["elbo"]))
    assert abs(float(cond["elbo"]) - float(ref["elbo"])) > 1e-3  # the fixture's non-zero gates do matter


def test_bfloat16_compute_stays_close_to_float32(case):
    """Mixed precision: bf16 convs with fp32 params, KL and likelihood; the ELBO moves by well under 1%."""
    model, params, hparams, ref = case
    eps = [ref[f"eps_{i:03d}"] for i in range(hparams["n_layers"])]
    inputs = (ref["hr_input"], ref["target"], ref["lr_input"])
    full = model.apply({"params": params}, *inputs, eps=eps)
    half = model.clone(dtype=jax.numpy.bfloat16).apply({"params": params}, *inputs, eps=eps)
    assert half["kl"].dtype == np.float32 and half["logits"].dtype == jax.numpy.bfloat16
    assert abs(float(half["elbo"]) - float(full["elbo"])) < 5e-3 * abs(float(full["elbo"]))
    assert float(half["elbo"]) != float(full["elbo"])
