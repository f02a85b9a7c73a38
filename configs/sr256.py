"""VDVAE-SR sr256 as in the thesis (Chira & Haralampiev, 2021): the FFHQ-256 VDVAE conditioned on a 64x64 LR image.

The HR model starts from the converted official ffhq256 checkpoint with its encoder frozen; the
decoder, the zero-initialised gates and the LR encoder (initialised from the ImageNet-64
checkpoint's encoder) train on DIV2K (95 epochs of 800 steps, batch 1). The optimiser, data
normalisation and architecture are the ffhq256 run's. Prepare both with
    python -m convert.vdvae --config=configs/vdvae_ffhq256.py --input=ffhq256-iter-1700000-model-ema.th \
        --output=checkpoints/ffhq256
    python -m convert.vdvae --config=configs/vdvae_imagenet64.py --input=imagenet64-iter-1600000-model-ema.th \
        --output=checkpoints/imagenet64_encoder --encoder_only
"""

from configs.vdvae_ffhq256 import get_config as hr_config


def get_config():
    config = hr_config()
    config.model.update(
        lr_image_size=64,
        lr_enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
        lr_width=512,
        lr_custom_width_str="",
    )
    config.data.update(dataset="div2k", source="tfds", preprocess="thesis", downscale="matlab", eval_images=16)
    config.train.update(
        batch_size_per_device=1,
        steps=95 * 800,
        steps_per_epoch=800,
        checkpoint_every=800,
        sample_every=8000,
        log_every=50,
        frozen=("encoder",),
    )
    config.upscale.overlap = 16  # a quarter of the 64-pixel LR tile
    config.init.update(hr_checkpoint="checkpoints/ffhq256", lr_encoder_checkpoint="checkpoints/imagenet64_encoder")
    return config
