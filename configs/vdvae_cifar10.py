"""Official VDVAE cifar10 configuration (openai/vdvae hps.py); `batch_size_per_device` is upstream's per-GPU n_batch.

Official checkpoint: cifar10-seed0-iter-900000-model-ema.th (39M params; seeds 0-3 average 2.87 bits/dim).
"""

from configs.common import vdvae_config


def get_config():
    return vdvae_config(
        model=dict(
            width=384,
            zdim=16,
            enc_blocks='32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3',
            dec_blocks='1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21',
            image_size=32,
            num_mixtures=10,
            custom_width_str='',
            bottleneck_multiple=0.25,
            no_bias_above=64,
            low_bit=False,
        ),
        data=dict(
            dataset='cifar10',
            shift=-120.63838,
            scale=0.015584247193588766,
            shift_loss=-127.5,
            scale_loss=0.00784313725490196,
        ),
        train=dict(
            lr=0.0002,
            wd=0.01,
            adam_beta1=0.9,
            adam_beta2=0.9,
            warmup_iters=100,
            grad_clip=200.0,
            skip_threshold=400.0,
            ema_rate=0.9999,
            batch_size_per_device=16,
        ),
        official_checkpoint='cifar10-seed0-iter-900000-model-ema.th',
    )
