"""The daemon's jobs: what a job is, and where jobs and their event history are kept.

- :mod:`lorad.jobs.records` — ``JobState``, the frozen ``JobRecord`` / ``EventRecord`` snapshots,
  and ``JobNotFound``.
- :mod:`lorad.jobs.store` — ``JobStore``: jobs and events in one SQLite file, every write committed
  before it returns (so they survive a crash), shared safely by the daemon's threads.

Importing this package is cheap (standard library only; never torch).
"""

from lorad.jobs.records import EventRecord, JobNotFound, JobRecord, JobState
from lorad.jobs.store import JobStore

__all__ = ["EventRecord", "JobNotFound", "JobRecord", "JobState", "JobStore"]
