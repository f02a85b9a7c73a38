"""A small unconditional VDVAE that trains on the photos shipped with scikit-image on a 2-core CPU.

Its architecture is that of the vdvae_tiny fixture, so the tests convert that checkpoint with it;
`demo.py` adds an LR encoder to it.
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
        ),
        data=dict(dataset="embedded photos", source="embedded", shift=-116.2373, scale=0.014414613881503804),
        train=dict(
            lr=2e-3, warmup_iters=20, grad_clip=200.0, skip_threshold=1000.0, ema_rate=0.99,
            batch_size_per_device=16, steps=300, log_every=25,
        ),
    )
    config.sample.num = 8
    return config
