"""One worker process per device: it owns the device, keeps that device's resident models and runs its jobs.

- :mod:`lorad.workers.link` — the channel between the daemon and a worker (a pipe): calls with answers,
  and one-way notes (a job's events, stop requests).
- :mod:`lorad.workers.host` — the worker's side: its registry, its jobs through the one training loop.
- :mod:`lorad.workers.handle` — the daemon's side: start a worker (``spawn``), notice its death, start it again.

Importing this package is cheap (nothing is imported here; the modules import torch only when they train).
"""
