"""The SDXL family: SDXL base 1.0 and its fine-tunes (Pony, Illustrious, NoobAI, ...)."""
