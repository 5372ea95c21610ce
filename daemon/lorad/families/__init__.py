"""Model families: one package per family (SD 1.x/2.x, LLM, ...), each a plug-in of the one
training loop in :mod:`lorad.training.loop`. :mod:`lorad.training.family` holds the registry."""
