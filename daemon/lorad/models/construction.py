"""One process-wide lock around building torch modules while other threads may be loading models.

diffusers loads weights under accelerate's ``init_empty_weights``, which patches
``torch.nn.Module.register_parameter`` for the whole process, not the calling thread: while one
thread loads a base model, a module built on any other thread gets its parameters on the meta
device. In the daemon the worker loads base models and attaches adapters while caption requests
and watched folders load captioners on their own threads; without this lock a captioner loaded
during a job's model load failed with "Cannot copy out of meta tensor" (or an adapter attached
during a captioner's load could silently land on meta). Every model load in the registry and every
adapter attach holds it. It is re-entrant, so a loader may attach or build what it needs.
"""

from __future__ import annotations

import threading

MODULE_CONSTRUCTION = threading.RLock()
