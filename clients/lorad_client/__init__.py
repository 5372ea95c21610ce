"""lorad_client: the typed Python client of the lorad daemon (gRPC).

Importing it is cheap: it needs only grpc, protobuf, the generated ``lorad_api`` stubs and
its own ``paths``; it never imports the daemon package, torch, diffusers or transformers (a test checks this).

    from lorad_client import LoradClient, JOB_STATE_RUNNING

    with LoradClient.connect() as client:      # finds the local daemon and its token
        print(client.status().version)

Messages are the generated classes (``Job``, ``JobEvent``, ...); ``lorad_client.format`` has text
helpers for showing them.
"""

from lorad_api.v1.caption_pb2 import (
    CAPTION_FORMAT_CSV,
    CAPTION_FORMAT_TXT,
    CAPTION_FORMAT_UNSPECIFIED,
    CAPTIONER_KIND_BLIP,
    CAPTIONER_KIND_CLIP,
    CAPTIONER_KIND_WD14,
    CaptionImagesResponse,
    CaptionOptions,
)
from lorad_api.v1.jobs_pb2 import (
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_INTERRUPTED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    JOB_STATE_UNSPECIFIED,
    Job,
    JobEvent,
    JobState,
    Progress,
)
from lorad_api.v1.training_pb2 import WatchJobResponse
from lorad_api.v1.watch_pb2 import FollowWatchesResponse, Watch, WatchPolicy
from lorad_client.client import CaptionStream, JobWatch, LoradClient, WatchFollow
from lorad_client.discovery import DaemonTarget, find_daemon
from lorad_client.errors import DaemonNotVerified, DaemonUnavailable, LoradRpcError

# States a job never leaves. INTERRUPTED is not one: the daemon queues such a job again on restart.
FINAL_STATES = frozenset({JOB_STATE_SUCCEEDED, JOB_STATE_FAILED, JOB_STATE_CANCELLED})

__all__ = [
    "CAPTIONER_KIND_BLIP",
    "CAPTIONER_KIND_CLIP",
    "CAPTIONER_KIND_WD14",
    "CAPTION_FORMAT_CSV",
    "CAPTION_FORMAT_TXT",
    "CAPTION_FORMAT_UNSPECIFIED",
    "FINAL_STATES",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_FAILED",
    "JOB_STATE_INTERRUPTED",
    "JOB_STATE_QUEUED",
    "JOB_STATE_RUNNING",
    "JOB_STATE_SUCCEEDED",
    "JOB_STATE_UNSPECIFIED",
    "CaptionImagesResponse",
    "CaptionOptions",
    "CaptionStream",
    "DaemonNotVerified",
    "DaemonTarget",
    "DaemonUnavailable",
    "FollowWatchesResponse",
    "Job",
    "JobEvent",
    "JobState",
    "JobWatch",
    "LoradClient",
    "LoradRpcError",
    "Progress",
    "Watch",
    "WatchFollow",
    "WatchJobResponse",
    "WatchPolicy",
    "find_daemon",
]
