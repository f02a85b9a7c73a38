"""Official VDVAE ffhq256 configuration (openai/vdvae hps.py); `batch_size_per_device` is upstream's per-GPU n_batch.

Official checkpoint: ffhq256-iter-1700000-model-ema.th (115M params; 0.4232 nats/dim = 0.61 bits/dim, 5-bit data).
"""

from configs.common import vdvae_config


def get_config():
    return vdvae_config(
        model=dict(
            width=512,
            zdim=16,
            enc_blocks='256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4',
            dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128',
            image_size=256,
            num_mixtures=10,
            custom_width_str='',
            bottleneck_multiple=0.25,
            no_bias_above=64,
            low_bit=True,
        ),
        data=dict(
            dataset='ffhq_256',
            shift=-112.8666757481,
            scale=0.014316842633769705,
            shift_loss=-127.5,
            scale_loss=0.00784313725490196,
        ),
        train=dict(
            lr=0.00015,
            wd=0.01,
            adam_beta1=0.9,
            adam_beta2=0.9,
            warmup_iters=100,
            grad_clip=130.0,
            skip_threshold=180.0,
            ema_rate=0.999,
            batch_size_per_device=1,
        ),
        official_checkpoint='ffhq256-iter-1700000-model-ema.th',
    )
