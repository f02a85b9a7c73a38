"""A small VDVAE-SR (32x32 HR from 8x8 LR) that trains from scratch on the photos shipped with scikit-image.

The README's first command runs it: on a 2-core CPU it trains in a few minutes, its ELBO falls,
and its sample grids (LR | bicubic | SR at 3 temperatures | HR) sharpen. Nothing is downloaded.
"""

from configs.common import vdvae_config


def get_config():
    config = vdvae_config(
        model=dict(
            width=32,
            zdim=4,
            enc_blocks="32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2",
            dec_blocks="1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2",
            image_size=32,
            num_mixtures=3,
            lr_image_size=8,
            lr_enc_blocks="8x2,8d2,4x2,4d4,1x2",
            lr_width=32,
            lr_custom_width_str="",
        ),
        data=dict(dataset="embedded photos", source="embedded", preprocess="crops", shift=-115.92961967,
                  scale=0.014414613881503804, eval_images=8),
        train=dict(
            lr=2e-3, warmup_iters=20, grad_clip=200.0, skip_threshold=1000.0, ema_rate=0.99,
            batch_size_per_device=16, steps=400, steps_per_epoch=100, log_every=20, sample_every=100,
            checkpoint_every=100,
        ),
    )
    config.sample.temperatures = (1.0, 0.6, 0.1)
    config.scan_unroll = 64  # CPU: unroll every run (XLA:CPU runs conv gradients in loops ~10x slower)
    return config
