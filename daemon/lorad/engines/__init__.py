"""Training engines: one plain PyTorch loop per model family."""
