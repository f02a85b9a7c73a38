"""Number-for-number parity with the official PyTorch VDVAE on the reference fixtures."""

import jax
import pytest
from conftest import assert_close, assert_posterior_matches, load_reference, reference_dir

from vdvae_sr_jax.convert import convert_state_dict
from vdvae_sr_jax.model import VDVAE, init_params, model_from_hparams
from vdvae_sr_jax.torch_reader import load_state_dict


@pytest.fixture(scope="module", params=["vdvae_tiny", "vdvae_custom"])
def case(request):
    hparams, ref = load_reference(request.param)
    model = model_from_hparams(hparams)
    template = jax.eval_shape(lambda: init_params(model))
    params = convert_state_dict(load_state_dict(reference_dir(request.param) / "model.th"), template)
    return model, params, hparams, ref


def test_bottom_up_activations(case):
    model, params, _, ref = case
    acts = model.apply({"params": params}, ref["input"], method=VDVAE.encode)
    expected = {int(k.split("_")[-1]) for k in ref if k.startswith("enc_act_")}
    assert set(acts) == expected
    for res, act in acts.items():
        assert_close(act, ref[f"enc_act_{res}"], 1e-5, f"enc_act_{res}")


def test_posterior_pass_given_noise(case):
    model, params, hparams, ref = case
    n_layers = hparams["n_layers"]
    eps = [ref[f"eps_{i:03d}"] for i in range(n_layers)]
    out = model.apply({"params": params}, ref["input"], ref["target"], eps=eps)
    assert_posterior_matches(out, ref, n_layers)


def test_posterior_pass_given_latents(case):
    model, params, hparams, ref = case
    latents = [ref[f"z_{i:03d}"] for i in range(hparams["n_layers"])]
    out = model.apply({"params": params}, ref["input"], ref["target"], latents=latents,
                      rngs={"sample": jax.random.key(7)})
    assert_close(out["kl"], ref["kl"], 1e-4, "kl")
    assert_close(out["elbo"], ref["elbo"], 1e-4, "elbo")


def test_generative_pass_with_manual_latents(case):
    model, params, hparams, ref = case
    latents = [ref[f"z_{i:03d}"] for i in range(hparams["n_layers"])]
    px_z, logits = model.apply({"params": params}, len(ref["target"]), latents=latents,
                               method=VDVAE.generate, rngs={"sample": jax.random.key(0)})
    assert_close(px_z, ref["prior_px_z"], 1e-4, "prior_px_z")
    assert_close(logits, ref["prior_dmol_logits"], 1e-4, "prior_dmol_logits")


def test_param_count_matches_official(case):
    _, params, hparams, _ = case
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == hparams["n_params"]


def test_latent_injection_with_a_traced_count_equals_a_shorter_list(case):
    model, params, hparams, ref = case
    latents = [ref[f"z_{i:03d}"] for i in range(hparams["n_layers"])]

    @jax.jit
    def first_k(k):
        return model.apply({"params": params}, len(ref["target"]), latents=latents, n_latents=k,
                           method=VDVAE.generate, rngs={"sample": jax.random.key(3)})[0]

    for k in (0, 2):
        shorter = model.apply({"params": params}, len(ref["target"]), latents=latents[:k],
                              method=VDVAE.generate, rngs={"sample": jax.random.key(3)})[0]
        assert_close(first_k(k), shorter, 1e-6, f"k={k}")
    assert_close(first_k(hparams["n_layers"]), ref["prior_px_z"], 1e-4, "all layers")
    assert float(abs(first_k(0) - first_k(2)).max()) > 1e-3
