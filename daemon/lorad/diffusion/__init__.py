"""Pieces the image families share: VAE latents, the DDPM (epsilon / v-prediction) objective,
flow matching, and cached text-encoder outputs."""
