"""Base models: loading Stable Diffusion 1.x/2.x components offline, and tiny random models for tests."""
