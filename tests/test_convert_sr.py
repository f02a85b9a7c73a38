"""The thesis' two checkpoints (the HR model with its gates, the LR model) into one VDVAE-SR orbax checkpoint, by
the command line, and its one-line refusals."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_posterior_matches, load_reference, reference_dir

from configs.demo import get_config as sr_demo_config
from configs.demo_vdvae import get_config as vdvae_config
from vdvae_sr_jax.checkpoint import load_params
from vdvae_sr_jax.convert import ConversionError, convert_to_orbax
from vdvae_sr_jax.model import model_from_hparams

ROOT = Path(__file__).resolve().parents[1]


def sr_tiny_flags() -> list[str]:
    """--config overrides that make configs/demo.py the sr_tiny fixture's model."""
    hparams, _ = load_reference("sr_tiny")
    hr, lr = hparams["hr"], hparams["lr"]
    return ["--config=configs/demo.py", f"--config.model.image_size={hr['image_size']}",
            f"--config.model.enc_blocks={hr['enc_blocks']}", f"--config.model.dec_blocks={hr['dec_blocks']}",
            f"--config.model.lr_image_size={lr['image_size']}", f"--config.model.lr_enc_blocks={lr['enc_blocks']}",
            f"--config.model.lr_width={lr['width']}"]


def test_cli_converts_the_thesis_pair_and_reproduces_the_fixture(tmp_path, subprocess_env):
    fixture = reference_dir("sr_tiny")
    out = tmp_path / "sr"
    run = subprocess.run([sys.executable, "-m", "convert.vdvae", *sr_tiny_flags(), f"--input={fixture / 'hr_model.th'}",
                          f"--lr_input={fixture / 'lr_model.th'}", f"--output={out}"],
                         cwd=ROOT, capture_output=True, text=True, env=subprocess_env)
    assert run.returncode == 0, run.stderr
    params, metadata = load_params(out)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert run.stdout.strip() == (f"wrote {n:,} parameters from {fixture / 'hr_model.th'} and "
                                  f"{fixture / 'lr_model.th'} to {out}")
    assert metadata["lr_source"] == str(fixture / "lr_model.th") and metadata["model"]["lr_image_size"] == 16
    assert set(params) == {"encoder", "decoder", "lr_encoder"}

    hparams, ref = load_reference("sr_tiny")
    model = model_from_hparams(metadata["model"])
    eps = [ref[f"eps_{i:03d}"] for i in range(hparams["n_layers"])]
    out = jax.jit(lambda p: model.apply({"params": p}, ref["hr_input"], ref["target"], ref["lr_input"], eps=eps))
    assert_posterior_matches(out(params), ref, hparams["n_layers"])


def test_sr_config_without_the_lr_model_is_one_line(tmp_path):
    with pytest.raises(ConversionError) as error:
        convert_to_orbax(sr_demo_config(), reference_dir("sr_tiny") / "hr_model.th", tmp_path / "out")
    assert str(error.value) == ("the config is a VDVAE-SR model (model.lr_enc_blocks is set): give the LR model as "
                                "well (--lr_input), or convert with the HR model's own config")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("encoder_only", [False, True])
def test_lr_model_needs_an_sr_config_and_a_whole_model(tmp_path, encoder_only):
    fixture = reference_dir("sr_tiny")
    config = sr_demo_config() if encoder_only else vdvae_config()
    with pytest.raises(ConversionError, match=r"^an LR model \(--lr_input\) goes with a VDVAE-SR config"):
        convert_to_orbax(config, fixture / "hr_model.th", tmp_path / "out", encoder_only, fixture / "lr_model.th")
    assert not (tmp_path / "out").exists()


def test_hr_file_holding_lr_encoder_keys_is_refused_by_name(tmp_path):
    torch = pytest.importorskip("torch")
    fixture = reference_dir("sr_tiny")
    state_dict = torch.load(fixture / "hr_model.th", weights_only=True)
    state_dict["lr_encoder.in_conv.bias"] = torch.zeros(32)
    torch.save(state_dict, tmp_path / "hr.th")
    hparams, _ = load_reference("sr_tiny")
    config = sr_demo_config()
    config.model.update(image_size=64, enc_blocks=hparams["hr"]["enc_blocks"], dec_blocks=hparams["hr"]["dec_blocks"],
                        lr_image_size=16, lr_enc_blocks=hparams["lr"]["enc_blocks"])
    with pytest.raises(ConversionError) as error:
        convert_to_orbax(config, tmp_path / "hr.th", tmp_path / "out", lr_source=fixture / "lr_model.th")
    assert str(error.value) == (f"{tmp_path / 'hr.th'} already holds 'lr_encoder.in_conv.bias', which the LR encoder "
                                f"of {fixture / 'lr_model.th'} provides")
    assert not (tmp_path / "out").exists()
    np.testing.assert_array_equal(torch.load(tmp_path / "hr.th", weights_only=True)["lr_encoder.in_conv.bias"], 0)
