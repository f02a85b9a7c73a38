"""Adversarial fine-tuning of VDVAE-SR sr64 (a VAE-GAN): the trained sr64 run, then a PatchGAN discriminator beside
the ELBO, with the HR encoder still frozen.

It starts from the newest checkpoint of `runs/sr64` (its EMA params; the frozen encoder comes from the converted
imagenet64 model, as in sr64):
    python -m vdvae_sr_jax.main --config=configs/sr64_gan.py --workdir=runs/sr64_gan
"""

from configs.sr64 import get_config as sr64_config


def get_config():
    config = sr64_config()
    config.init.sr_checkpoint = "runs/sr64"
    config.train.update(adversarial_weight=0.05, steps=20 * 200, warmup_iters=100)
    return config
