"""Official VDVAE imagenet32 configuration (openai/vdvae hps.py); `batch_size_per_device` is upstream's per-GPU n_batch.

Official checkpoint: imagenet32-iter-1700000-model-ema.th (119M params; test 2.6364 nats/dim = 3.80 bits/dim).
"""

from configs.common import vdvae_config


def get_config():
    return vdvae_config(
        model=dict(
            width=512,
            zdim=16,
            enc_blocks='32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6',
            dec_blocks='1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40',
            image_size=32,
            num_mixtures=10,
            custom_width_str='',
            bottleneck_multiple=0.25,
            no_bias_above=64,
            low_bit=False,
        ),
        data=dict(
            dataset='imagenet32',
            shift=-116.2373,
            scale=0.014414613881503804,
            shift_loss=-127.5,
            scale_loss=0.00784313725490196,
        ),
        train=dict(
            lr=0.00015,
            wd=0.01,
            adam_beta1=0.9,
            adam_beta2=0.9,
            warmup_iters=100,
            grad_clip=200.0,
            skip_threshold=300.0,
            ema_rate=0.999,
            batch_size_per_device=8,
        ),
        official_checkpoint='imagenet32-iter-1700000-model-ema.th',
    )
