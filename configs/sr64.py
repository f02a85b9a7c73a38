"""VDVAE-SR sr64 as in the thesis (Chira & Haralampiev, 2021): imagenet64 HR model, 16x16 LR input.

The HR model starts from the converted official imagenet64 checkpoint with its encoder frozen; the
decoder, the zero-initialised gates and the LR encoder (from scratch: the ImageNet-32 encoder
restricted to 16x16 and below) train on DIV2K (200 epochs of 200 steps, batch 4). The optimiser
follows the imagenet64 run.
Prepare the HR model with
    python -m convert.vdvae --config=configs/vdvae_imagenet64.py --input=imagenet64-iter-1600000-model-ema.th \
        --output=checkpoints/imagenet64
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
            lr_image_size=16,
            lr_enc_blocks='16x9,16d2,8x8,8d2,4x6,4d4,1x6',
            lr_width=512,
            lr_custom_width_str='',
        ),
        data=dict(
            dataset='div2k',
            source='tfds',
            preprocess='thesis',
            downscale='matlab',
            shift=-115.92961967,
            scale=0.014414613881503804,
            shift_loss=-127.5,
            scale_loss=0.00784313725490196,
            eval_images=16,
        ),
        train=dict(
            lr=0.00015,
            wd=0.01,
            warmup_iters=100,
            grad_clip=220.0,
            skip_threshold=380.0,
            ema_rate=0.999,
            batch_size_per_device=4,
            steps=40000,
            steps_per_epoch=200,
            frozen=('encoder',),
            log_every=50,
            sample_every=2000,
            checkpoint_every=200,
        ),
        init=dict(
            hr_checkpoint='checkpoints/imagenet64',
            lr_encoder_checkpoint='',
        ),
    )
