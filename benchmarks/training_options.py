"""What each added loss term of a VDVAE-SR costs per training step: the plain ELBO step against each option alone and
all of them, timed in turns within one process, so that a busy or throttled machine slows them all alike.

    python -m benchmarks.training_options --config=configs/demo.py --batch_size=16 --rounds=15

Prints the median step time of each variant and its ratio to the plain step, as JSON and a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks.programs import train_inputs, train_step
from vdvae_sr_jax.model import model_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "A VDVAE-SR config file in configs/.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Timed steps of each variant, taken in turns.")

OPTIONS = {
    "plain": {},
    "lr_consistency": {"lr_consistency_weight": 1.0},
    "perceptual (LPIPS-VGG)": {"perceptual_weight": 1.0, "perceptual_net": "lpips_vgg"},
    "perceptual (LPIPS-Alex)": {"perceptual_weight": 1.0, "perceptual_net": "lpips_alex"},
    "adversarial": {"adversarial_weight": 0.05},
    "all three (LPIPS-VGG)": {"lr_consistency_weight": 1.0, "perceptual_weight": 1.0, "perceptual_net": "lpips_vgg",
                              "adversarial_weight": 0.05},
}


def compiled_variants(config, batch_size: int) -> dict:
    """{name: [compiled step, its inputs]} for each entry of OPTIONS, compiled and run once."""
    variants = {}
    for name, weights in OPTIONS.items():
        variant = config.copy_and_resolve_references()
        variant.train.update(weights)
        model = model_from_config(variant)
        args = train_inputs(variant, model, batch_size)
        step = train_step(variant, model).lower(*args).compile()
        args = (jax.block_until_ready(step(*args))[0], *args[1:])
        variants[name] = [step, args]
    return variants


def time_in_turns(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant's device-synchronised step, `rounds` times, one step of each variant per round."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, entry in variants.items():
            step, args = entry
            start = time.perf_counter()
            state, _ = jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
            entry[1] = (state, *args[1:])
    return times


def main(argv) -> None:
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    times = time_in_turns(compiled_variants(_CONFIG.value, _BATCH.value), _ROUNDS.value)
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {"device": jax.devices()[0].device_kind, "batch_size": _BATCH.value, "rounds": _ROUNDS.value,
              "median_seconds": medians, "ratio_to_plain": {n: m / medians["plain"] for n, m in medians.items()}}
    print(json.dumps(report, indent=1))
    print("| option | median step | vs plain |\n|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {1000 * median:.0f} ms | {median / medians['plain']:.2f}x |")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
