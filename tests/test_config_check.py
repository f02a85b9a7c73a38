"""Config validation: impossible values are named before anything runs, and `main` reports them in one line."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from vdvae_sr_jax import config_check

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


def _config(name="demo"):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_is_valid(name):
    assert config_check.problems(_config(name)) == []


@pytest.mark.parametrize("key, value, must", [
    ("train.steps", -1, "a whole number of at least 1"),
    ("train.batch_size_per_device", 0, "a whole number of at least 1"),
    ("train.checkpoint_every", 0, "a whole number of at least 1"),
    ("train.steps_per_epoch", 0, "a whole number of at least 1"),
    ("train.lr", 0.0, "a number above 0"),
    ("train.ema_rate", 1.5, "a number at least 0 and at most 1"),
    ("train.grad_clip", float("nan"), "a number above 0"),
    ("data.source", "div2k", "one of 'embedded', 'folder', 'tfds'"),
    ("compute_dtype", "float64", "one of 'float32', 'bfloat16', 'float16'"),
    ("upscale.num_samples", 0, "a whole number of at least 1"),
    ("sample.temperatures", (1.0, -0.5), "one or more numbers of at least 0"),
])
def test_an_impossible_value_is_named_with_what_it_must_be(key, value, must):
    config = _config()
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
    assert config_check.problems(config) == [f"{key}={value!r}: must be {must}"]


def test_rules_across_fields():
    config = _config()
    config.data.source = "folder"
    config.train.skip_threshold = 0.0
    config.upscale.overlap = config.model.lr_image_size
    assert config_check.problems(config) == [
        "data.folder='': data.source='folder' needs the folder of training images (--config.data.folder=DIR)",
        "train.skip_threshold=0.0: must be above 0, or -1 to never skip",
        "upscale.overlap=8: must be less than the LR tile, model.lr_image_size=8",
    ]
    with pytest.raises(config_check.ConfigError) as raised:
        config_check.validate(config)
    assert str(raised.value) == "invalid config (3 values): " + "; ".join(config_check.problems(config))


def test_the_added_losses_need_a_vdvae_sr_and_a_discriminator_that_fits_the_image():
    gan = _config()  # demo: 32x32 images
    gan.train.update(adversarial_weight=0.1, disc_widths=(8, 8, 8, 8))
    assert config_check.problems(gan) == []  # three halvings leave a 4x4 map, two 4x4 convs a 2x2 of patches
    gan.train.disc_widths = (8, 8, 8, 8, 8)
    assert config_check.problems(gan) == [
        "train.disc_widths=(8, 8, 8, 8, 8): 4 halvings leave the discriminator no patch of a 32-pixel image; use at "
        "most 4 widths"]
    vdvae = _config("demo_vdvae")
    vdvae.train.perceptual_weight = 0.5
    assert config_check.problems(vdvae) == [
        "train.perceptual_weight=0.5: the added loss terms need a VDVAE-SR (a config with model.lr_image_size); use "
        "0 for a VDVAE"]


def _main(tmp_path, *flags, env=None, config="configs/demo.py"):
    args = [sys.executable, "-m", "vdvae_sr_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}", *flags]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_main_reports_invalid_values_and_unknown_keys_in_one_line_before_running(tmp_path, subprocess_env):
    done = _main(tmp_path, "--config.train.steps=-1", "--config.train.checkpoint_every=0", env=subprocess_env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "invalid config (2 values): train.steps=-1: must be a whole number of at least 1; "
        "train.checkpoint_every=0: must be a whole number of at least 1"]
    assert not (tmp_path / "run").exists()  # nothing ran, not even the workdir

    done = _main(tmp_path, "--config.train.stepz=3", env=subprocess_env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["--config.train.stepz: the config has no key 'stepz'; did you mean 'steps'?"]

    broken = tmp_path / "broken.py"
    broken.write_text("from configs.demo import get_config as demo\n\n\ndef get_config():\n    config = demo()\n"
                      "    config.train.steps = config.train.no_such_key\n    return config\n")
    done = _main(tmp_path, env=subprocess_env, config=broken)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [  # a bug in the file is not taken for an unknown override
        "--config: AttributeError while building the config: \"'no_such_key'\" (run with VDVAE_SR_TRACEBACK=1 for "
        "the traceback)"]

    done = _main(tmp_path, "--config.train.steps=-1", env=dict(subprocess_env, VDVAE_SR_TRACEBACK="1"))
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "vdvae_sr_jax.config_check.ConfigError: invalid config (1 value): train.steps=-1" in done.stderr
