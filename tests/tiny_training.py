"""Runs a few steps of a very small VDVAE-SR with trainer.run and saves its EMA and raw params; used by the
trainer tests in subprocesses (fake CPU devices must be set up before jax is imported). Also a config file for
the command line: `--config=tests/tiny_training.py:STEPS,BATCH_PER_DEVICE,CHECKPOINT_EVERY`.

    python tests/tiny_training.py WORKDIR STEPS BATCH_PER_DEVICE [CHECKPOINT_EVERY [TRAIN_KEY=VALUE ...]]

The TRAIN_KEY=VALUE pairs set numbers in config.train, e.g. adversarial_weight=0.1.
"""

import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import demo  # noqa: E402
from vdvae_sr_jax import checkpoint, trainer  # noqa: E402
from vdvae_sr_jax.model import model_from_config  # noqa: E402


def tiny_config(steps: int, batch_per_device: int, checkpoint_every: int):
    config = demo.get_config()
    config.model.update(width=16, zdim=2, image_size=16, lr_image_size=4, enc_blocks="16x1,16d2,8x1,8d2,4x1,4d4,1x1",
                        dec_blocks="1x1,4m1,8m4,8x1,16m8,16x1", lr_enc_blocks="4x1,4d4,1x1", lr_width=16)
    config.train.update(steps=steps, batch_size_per_device=batch_per_device, log_every=1, steps_per_epoch=1000,
                        sample_every=0, checkpoint_every=checkpoint_every, frozen=("encoder",))
    config.data.eval_images = 4
    return config


def get_config(arg: str):
    return tiny_config(*map(int, arg.split(",")))


def main() -> None:
    workdir, steps, per_device = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    config = tiny_config(steps, per_device, int(sys.argv[4]) if len(sys.argv) > 4 else 1000)
    for pair in sys.argv[5:]:
        key, value = pair.split("=")
        config.train[key] = float(value)
    result = trainer.run(config, workdir)
    model = model_from_config(config)
    ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", config.train.keep_checkpoints)
    state = ckpts.restore_latest(trainer.abstract_state(config, model)[0])
    ckpts.close()
    flat = {f"params/{k}": v for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    flat |= {f"ema/{k}": v for k, v in jax.tree_util.tree_flatten_with_path(state.ema_params)[0]}
    flat |= {f"disc/{k}": v for k, v in jax.tree_util.tree_flatten_with_path(state.disc)[0]}
    np.savez(workdir / "final.npz", **{str(k): np.asarray(v) for k, v in flat.items()},
             step=int(state.step), stopped=result["stopped"], devices=jax.device_count())


if __name__ == "__main__":
    main()
