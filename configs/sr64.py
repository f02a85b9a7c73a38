"""VDVAE-SR sr64 as in the thesis (Chira & Haralampiev, 2021): the ImageNet-64 VDVAE conditioned on a 16x16 LR image.

The HR model starts from the converted official imagenet64 checkpoint with its encoder frozen;
the decoder, the zero-initialised gates and the LR encoder (from scratch: the ImageNet-32 encoder
restricted to 16x16 and below) train on DIV2K (200 epochs of 200 steps, batch 4). The optimiser,
data normalisation and architecture are the imagenet64 run's. Prepare the HR model with
    python -m convert.vdvae --config=configs/vdvae_imagenet64.py --input=imagenet64-iter-1600000-model-ema.th \
        --output=checkpoints/imagenet64
"""

from configs.vdvae_imagenet64 import get_config as hr_config


def get_config():
    config = hr_config()
    config.model.update(
        lr_image_size=16,
        lr_enc_blocks='16x9,16d2,8x8,8d2,4x6,4d4,1x6',
        lr_width=512,
        lr_custom_width_str="",
    )
    config.data.update(dataset="div2k", source="tfds", preprocess="thesis", downscale="matlab", eval_images=16)
    config.train.update(
        batch_size_per_device=4,
        steps=200 * 200,
        steps_per_epoch=200,
        checkpoint_every=200,
        sample_every=2000,
        log_every=50,
        frozen=("encoder",),
    )
    config.upscale.overlap = 4  # a quarter of the 16-pixel LR tile
    config.init.update(hr_checkpoint="checkpoints/imagenet64")
    return config
