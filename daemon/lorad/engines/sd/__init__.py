"""Stable Diffusion LoRA training (UNet and optionally the CLIP text encoder)."""
