"""Model families: one package per family (its config keys, data, model loading, loss and export)."""
