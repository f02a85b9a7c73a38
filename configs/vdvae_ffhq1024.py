"""Official VDVAE ffhq1024 configuration (openai/vdvae hps.py); `batch_size_per_device` is upstream's per-GPU n_batch.

Official checkpoint: ffhq1024-iter-1700000-model-ema.th (115M params; 1.678 nats/dim = 2.42 bits/dim).
Inputs are floats in [0, 1] for this dataset (pixel_max=1), as upstream loads it.
"""

from configs.common import vdvae_config


def get_config():
    return vdvae_config(
        model=dict(
            width=16,
            zdim=16,
            enc_blocks='1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4',
            dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,512m256,1024m512',
            image_size=1024,
            num_mixtures=2,
            custom_width_str='512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512',
            bottleneck_multiple=0.25,
            no_bias_above=64,
            low_bit=False,
        ),
        data=dict(
            dataset='ffhq_1024',
            shift=-0.4387,
            scale=3.6456434560699966,
            shift_loss=-0.5,
            scale_loss=2.0,
            pixel_max=1.0,
        ),
        train=dict(
            lr=7e-05,
            wd=0.01,
            adam_beta1=0.9,
            adam_beta2=0.9,
            warmup_iters=100,
            grad_clip=360.0,
            skip_threshold=500.0,
            ema_rate=0.999,
            batch_size_per_device=1,
        ),
        official_checkpoint='ffhq1024-iter-1700000-model-ema.th',
    )
