"""VDVAE-SR sr256 as in the thesis (Chira & Haralampiev, 2021): ffhq256 HR model, 64x64 LR input.

The HR model starts from the converted official ffhq256 checkpoint with its encoder frozen; the
decoder, the zero-initialised gates and the LR encoder (from the ImageNet-64 checkpoint's
encoder) train on DIV2K (95 epochs of 800 steps, batch 1). The optimiser follows the ffhq256 run.
Prepare both with
    python -m convert.vdvae --config=configs/vdvae_ffhq256.py --input=ffhq256-iter-1700000-model-ema.th \
        --output=checkpoints/ffhq256
    python -m convert.vdvae --config=configs/vdvae_imagenet64.py --input=imagenet64-iter-1600000-model-ema.th \
        --output=checkpoints/imagenet64_encoder --encoder_only
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
            lr_image_size=64,
            lr_enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
            lr_width=512,
            lr_custom_width_str='',
        ),
        data=dict(
            dataset='div2k',
            source='tfds',
            preprocess='thesis',
            downscale='matlab',
            shift=-112.8666757481,
            scale=0.014316842633769705,
            shift_loss=-127.5,
            scale_loss=0.00784313725490196,
            eval_images=16,
        ),
        train=dict(
            lr=0.00015,
            wd=0.01,
            warmup_iters=100,
            grad_clip=130.0,
            skip_threshold=180.0,
            ema_rate=0.999,
            batch_size_per_device=1,
            steps=76000,
            steps_per_epoch=800,
            frozen=('encoder',),
            log_every=50,
            sample_every=8000,
            checkpoint_every=800,
        ),
        init=dict(
            hr_checkpoint='checkpoints/ffhq256',
            lr_encoder_checkpoint='checkpoints/imagenet64_encoder',
        ),
    )
