"""`python -m convert.vdvae`: the checkpoint converter's command line, as the README runs it from the repository
root: an official VDVAE file, or with --lr_input the thesis' HR and LR pair for a VDVAE-SR config. The conversion
lives in `vdvae_sr_jax.convert`, which also runs as `python -m vdvae_sr_jax.convert`."""

from vdvae_sr_jax.convert import run_cli

if __name__ == "__main__":
    run_cli()
