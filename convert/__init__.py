"""Conversion of official PyTorch VDVAE checkpoints."""
