"""A small VDVAE-SR (32x32 HR from 8x8 LR) that trains from scratch on the photos shipped with scikit-image.

The README's first command runs it: on a 2-core CPU it trains in a few minutes, its ELBO falls,
and its sample grids (LR | bicubic | SR at 3 temperatures | HR) sharpen. Nothing is downloaded.
Its HR part is the architecture of `demo_vdvae.py`.
"""

from configs.demo_vdvae import get_config as hr_config


def get_config():
    config = hr_config()
    config.model.update(lr_image_size=8, lr_enc_blocks="8x2,8d2,4x2,4d4,1x2", lr_width=32, lr_custom_width_str="")
    config.data.update(preprocess="crops", shift=-115.92961967, scale=0.014414613881503804, eval_images=8)
    config.train.update(steps=400, steps_per_epoch=100, sample_every=100, checkpoint_every=100, log_every=20)
    config.sample.temperatures = (1.0, 0.6, 0.1)
    return config
