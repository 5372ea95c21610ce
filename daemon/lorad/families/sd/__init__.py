"""Stable Diffusion 1.x/2.x: LoRA on the UNet and optionally the CLIP text encoder."""
