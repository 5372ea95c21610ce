"""The one training loop (``loop.train``) and what every model family shares: the family protocol
and registry (``family``), checkpoints, optimizers and schedules, device placement, activation
checkpointing and the run summary."""
