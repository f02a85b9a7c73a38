"""The five official configs against official_hparams.json: values, and the parameter counts upstream states."""

import importlib
import json
import re

import jax
import pytest
from conftest import reference_dir

from vdvae_sr_jax.model import model_from_config

NAMES = ["cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024"]


@pytest.fixture(scope="module")
def official():
    return json.loads((reference_dir(".") / "official_hparams.json").read_text())["official_vdvae"]


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_official_hparams(name, official):
    config = importlib.import_module(f"configs.vdvae_{name}").get_config()
    hp = official[name]
    for key in config.model:
        assert config.model[key] == hp[key], key
    for key in ("shift", "scale", "shift_loss", "scale_loss", "dataset"):
        assert config.data[key] == hp[key], key
    for key in ("lr", "wd", "adam_beta1", "adam_beta2", "warmup_iters", "grad_clip", "skip_threshold", "ema_rate"):
        assert config.train[key] == hp[key], key
    assert config.train.batch_size_per_device == hp["n_batch"]
    assert hp["official_checkpoint"].startswith(config.official_checkpoint)


# ffhq1024 is left out: its official architecture strings build 109.4M parameters, while the
# stated figure (115M, as for ffhq256) cannot be checked without the checkpoint. See the README.
@pytest.mark.parametrize("name", ["cifar10", "imagenet32", "imagenet64", "ffhq256"])
def test_parameter_count_matches_the_official_checkpoint(name, official):
    config = importlib.import_module(f"configs.vdvae_{name}").get_config()
    model = model_from_config(config)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), "float32")
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "sample": jax.random.key(0)}, x, x), x)
    n = sum(p.size for p in jax.tree_util.tree_leaves(shapes))
    stated = int(re.search(r"\((\d+)M params", official[name]["official_checkpoint"]).group(1))
    assert round(n / 1e6) == stated
