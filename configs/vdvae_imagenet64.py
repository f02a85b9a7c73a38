"""Official VDVAE imagenet64 configuration (openai/vdvae hps.py); `batch_size_per_device` is upstream's per-GPU n_batch.

Official checkpoint: imagenet64-iter-1600000-model-ema.th (125M params; test 2.44 nats/dim = 3.52 bits/dim).
"""

from configs.common import vdvae_config


def get_config():
    return vdvae_config(
        model=dict(
            width=512,
            zdim=16,
            enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
            dec_blocks='1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12',
            image_size=64,
            num_mixtures=10,
            custom_width_str='',
            bottleneck_multiple=0.25,
            no_bias_above=64,
            low_bit=False,
        ),
        data=dict(
            dataset='imagenet64',
            shift=-115.92961967,
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
            grad_clip=220.0,
            skip_threshold=380.0,
            ema_rate=0.999,
            batch_size_per_device=4,
        ),
        official_checkpoint='imagenet64-iter-1600000-model-ema.th',
    )
