"""What image model families share: latents, noise, losses, text-encoder output caching."""
