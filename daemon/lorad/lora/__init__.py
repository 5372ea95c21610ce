"""LoRA networks: which layers get adapters, and the file formats other tools load."""
