"""VDVAE and VDVAE-SR (x4 super-resolution) in JAX/Flax."""
