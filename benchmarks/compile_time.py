"""Measures how long jit takes for a config's training loss and gradient (trace + lower, XLA compile).

    python benchmarks/compile_time.py --config=configs/vdvae_imagenet64.py --batch=4 [--config.scan_unroll=64]
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from vdvae_sr_jax.model import model_from_config
from vdvae_sr_jax.train import elbo_loss

_CONFIG = config_flags.DEFINE_config_file("config", None, "A VDVAE config file.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size to compile for.")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    model = model_from_config(config)
    size = config.model.image_size
    x = jnp.zeros((_BATCH.value, size, size, 3))
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(0)}
    params = jax.eval_shape(lambda: model.init(rngs, x[:1], x[:1]))
    grad_fn = jax.jit(jax.value_and_grad(elbo_loss(model), has_aux=True))
    batch = {"input": x, "target": x}
    start = time.perf_counter()
    lowered = grad_fn.lower(params["params"], batch, jax.random.key(1))
    traced = time.perf_counter() - start
    lowered.compile()
    compiled = time.perf_counter() - start - traced
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "n_params": n_params, "batch": _BATCH.value,
        "scan_unroll": config.scan_unroll, "trace_and_lower_s": round(traced, 1), "compile_s": round(compiled, 1),
        "total_s": round(traced + compiled, 1),
    }))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
