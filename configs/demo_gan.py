"""Adversarial fine-tuning of the demo VDVAE-SR (a VAE-GAN), CPU-sized.

It starts from the newest checkpoint of the README's first command (`runs/demo`, its EMA params) and trains on
with a PatchGAN discriminator beside the ELBO:
    python -m vdvae_sr_jax.main --config=configs/demo_gan.py --workdir=runs/demo_gan
"""

from configs.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.init.sr_checkpoint = "runs/demo"
    config.train.update(adversarial_weight=0.05, disc_widths=(32, 64, 128), steps=200, warmup_iters=20)
    return config
