"""The converter: official keys to stacked Flax params, strict checks, orbax output, and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_close, load_reference, reference_dir

from configs.demo_vdvae import get_config
from vdvae_sr_jax import cli
from vdvae_sr_jax.checkpoint import load_params
from vdvae_sr_jax.convert import ConversionError, convert_state_dict, convert_to_orbax, torch_keys
from vdvae_sr_jax.model import init_params, model_from_hparams
from vdvae_sr_jax.torch_reader import CheckpointFormatError, UnsafeCheckpointError, load_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    """The vdvae_tiny state dict and the template of the demo config, which has the same architecture."""
    model = model_from_hparams(get_config().model)
    template = jax.eval_shape(lambda: init_params(model))
    return load_state_dict(reference_dir("vdvae_tiny") / "model.th"), template


def test_key_mapping_stacks_runs_and_renames():
    keys, stacked = torch_keys(("decoder", "dec_blocks_2_4", "prior", "c4", "kernel"))
    assert stacked and keys == [f"decoder.dec_blocks.{i}.prior.c4.weight" for i in (2, 3, 4)]
    assert torch_keys(("encoder", "enc_blocks_5", "c1", "bias")) == (["encoder.enc_blocks.5.c1.bias"], False)
    assert torch_keys(("decoder", "bias_xs_1")) == (["decoder.bias_xs.1"], False)
    assert torch_keys(("decoder", "dec_blocks_0_1", "gate"))[0][1] == "decoder.dec_blocks.1.gate_param"


def test_every_weight_lands_transposed_in_place(tiny):
    state_dict, template = tiny
    params = convert_state_dict(state_dict, template)
    kernel = params["decoder"]["dec_blocks_1_3"]["enc"]["c2"]["kernel"]
    np.testing.assert_array_equal(kernel[2], state_dict["decoder.dec_blocks.3.enc.c2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["decoder"]["bias_xs_1"][0, 2, 3],
                                  state_dict["decoder.bias_xs.1"][0, :, 2, 3])
    n = sum(v.size for v in state_dict.values())
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == n


def test_module_prefix_is_accepted(tiny):
    state_dict, template = tiny
    plain = convert_state_dict(state_dict, template)
    prefixed = convert_state_dict({f"module.{k}": v for k, v in state_dict.items()}, template)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain, prefixed)


def test_wrong_shape_missing_and_unexpected_keys_are_all_named(tiny):
    state_dict, template = tiny
    bad = dict(state_dict)
    bad["decoder.dec_blocks.3.z_proj.weight"] = np.zeros((32, 5, 1, 1), np.float32)
    del bad["encoder.enc_blocks.7.c3.bias"]
    bad["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        convert_state_dict(bad, template, source="bad.th")
    message = str(error.value)
    assert "bad.th" in message
    assert "'decoder.dec_blocks.3.z_proj.weight' has shape (32, 5, 1, 1)" in message
    assert "missing key 'encoder.enc_blocks.7.c3.bias'" in message
    assert "unexpected key 'decoder.extra.weight'" in message


def test_wrong_shaped_checkpoint_writes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    state_dict = torch.load(reference_dir("vdvae_tiny") / "model.th", weights_only=True)
    state_dict["decoder.gain"] = torch.ones(1, 31, 1, 1)
    source = tmp_path / "bad.th"
    torch.save(state_dict, source)
    with pytest.raises(ValueError, match=r"'decoder\.gain' has shape \(1, 31, 1, 1\)"):
        convert_to_orbax(get_config(), source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malicious_checkpoint_is_refused_and_writes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    source = tmp_path / "evil.th"
    torch.save({"encoder.in_conv.weight": Exploit()}, source)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert_to_orbax(get_config(), source, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_writes_a_checkpoint_that_reproduces_the_elbo(tmp_path, subprocess_env):
    out = tmp_path / "tiny"
    source = reference_dir("vdvae_tiny") / "model.th"
    subprocess.run([sys.executable, "-m", "convert.vdvae", "--config=configs/demo_vdvae.py", f"--input={source}",
                    f"--output={out}"], cwd=ROOT, check=True, capture_output=True, env=subprocess_env)
    params, metadata = load_params(out)
    assert metadata["source"] == str(source) and metadata["model"]["dec_blocks"] == get_config().model.dec_blocks
    hparams, ref = load_reference("vdvae_tiny")
    model = model_from_hparams(hparams)
    eps = [ref[f"eps_{i:03d}"] for i in range(hparams["n_layers"])]
    stats = model.apply({"params": params}, ref["input"], ref["target"], eps=eps)
    assert_close(stats["elbo"], ref["elbo"], 1e-4, "elbo after orbax round trip")


def test_encoder_only_export(tmp_path):
    convert_to_orbax(get_config(), reference_dir("vdvae_tiny") / "model.th", tmp_path / "enc", encoder_only=True)
    params, metadata = load_params(tmp_path / "enc")
    assert set(params) == {"encoder"} and metadata["encoder_only"]
    hparams, ref = load_reference("vdvae_tiny")
    acts = model_from_hparams(hparams).apply({"params": params}, ref["input"], method="encode")
    assert_close(acts[4], ref["enc_act_4"], 1e-5, "enc_act_4")


def test_one_missing_key_of_a_scanned_run_is_one_fault(tiny):
    """decoder.dec_blocks.3 is the middle of the scanned run 2..4: its siblings' keys are used, not unexpected."""
    state_dict, template = tiny
    bad = {k: v for k, v in state_dict.items() if k != "decoder.dec_blocks.3.prior.c2.weight"}
    with pytest.raises(ConversionError) as error:
        convert_state_dict(bad, template, source="bad.th")
    assert str(error.value).splitlines() == [
        "bad.th does not match the config:",
        "  missing key 'decoder.dec_blocks.3.prior.c2.weight'",
        "1 missing, 0 unexpected, 0 mis-shaped: is --config the model this file was saved from?",
    ]


def test_many_faults_give_a_short_report_and_their_counts(tiny):
    state_dict, template = tiny
    keys = sorted(state_dict)
    bad = {k: v for k, v in state_dict.items() if k not in keys[:8]}
    bad |= {f"extra.{i}": np.zeros(1, np.float32) for i in range(242)}
    bad |= {k: np.zeros((3, 3), np.float32) for k in keys[8:12]}
    with pytest.raises(ConversionError) as error:
        convert_state_dict(bad, template, source="bad.th")
    lines = str(error.value).splitlines()
    assert lines[-1] == "8 missing, 242 unexpected, 4 mis-shaped: is --config the model this file was saved from?"
    assert len(lines) == 1 + 6 + 4 + 6 + 1
    assert "  ... and 3 more missing keys" in lines and "  ... and 237 more unexpected keys" in lines
    assert f"  missing key {keys[0]!r}" in lines and "  unexpected key 'extra.0'" in lines


def test_wrong_config_gives_a_short_report(tmp_path):
    """The sr_tiny HR model (64x64, its own blocks, gates) against the demo VDVAE config (32x32)."""
    source = reference_dir("sr_tiny") / "hr_model.th"
    with pytest.raises(ConversionError) as error:
        convert_to_orbax(get_config(), source, tmp_path / "out")
    lines = str(error.value).splitlines()
    assert lines[0] == f"{source} does not match the config:" and len(lines) == 16
    assert lines[-1] == "24 missing, 14 unexpected, 2 mis-shaped: is --config the model this file was saved from?"
    assert "  unexpected key 'decoder.dec_blocks.0.gate_param'" in lines
    assert not (tmp_path / "out").exists()


def test_module_prefix_beside_the_plain_key_is_refused(tiny):
    state_dict, template = tiny
    both = {**state_dict, "module.decoder.gain": state_dict["decoder.gain"] + 1}
    with pytest.raises(ConversionError) as error:
        convert_state_dict(both, template, source="both.th")
    assert str(error.value) == ("both.th holds both 'module.decoder.gain' and 'decoder.gain'; it is unclear which "
                                "to convert")


def test_existing_output_is_refused_before_the_input_is_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("good")
    with pytest.raises(FileExistsError) as error:
        convert_to_orbax(get_config(), tmp_path / "absent.th", out)
    assert str(error.value) == f"{out} already exists; choose a new output directory or remove it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "good"


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.th"
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "absent.th", "no checkpoint file at {input}"),
    (lambda tmp: tmp, "no checkpoint file at {input} (it is a directory)"),
    (_corrupt, "{input}: damaged zip archive: its central directory is missing (truncated?)"),
])
def test_user_errors_end_in_one_line(tmp_path, monkeypatch, make, expected):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    source = make(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.one_line_errors(convert_to_orbax)(get_config(), source, tmp_path / "out")
    assert exit_.value.code == expected.format(input=source)
    assert not (tmp_path / "out").exists()


def test_unsafe_file_in_one_line_and_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    evil = tmp_path / "evil.th"
    evil.write_bytes(b"\x80\x02cposix\nsystem\n.")
    with pytest.raises(SystemExit) as exit_:
        cli.one_line_errors(load_state_dict)(evil)
    assert exit_.value.code == (f"refusing to load {evil}: it references posix.system, which is not a tensor or a "
                                "container; only plain state dicts are accepted")
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(CheckpointFormatError):
        cli.one_line_errors(load_state_dict)(_corrupt(tmp_path))


def test_cli_prints_one_line_and_fails(tmp_path, subprocess_env):
    source = _corrupt(tmp_path)
    env = {k: v for k, v in subprocess_env.items() if k != cli.TRACEBACK_VARIABLE}
    run = subprocess.run([sys.executable, "-m", "convert.vdvae", "--config=configs/demo_vdvae.py", f"--input={source}",
                          f"--output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == f"{source}: damaged zip archive: its central directory is missing " \
                                                  "(truncated?)"
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
