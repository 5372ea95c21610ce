"""Conversions between lorad's domain objects and the lorad.v1 protobuf messages.

Daemon side: job records, history rows, resident models, status and caption updates → messages
(the CLI converts in-process caption updates the same way, so one renderer draws both). Client side:
a JobEvent message → the engine's event dataclass, so the CLI draws daemon jobs with the same
progress renderer as in-process runs. Imports no torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from lorad import events as ev
from lorad.captioning import options as cu_options
from lorad.captioning import updates as cu
from lorad.jobs.payloads import engine_event_payload
from lorad.jobs.records import EventRecord, JobRecord, JobState
from lorad_api.v1 import caption_pb2, jobs_pb2, lora_tools_pb2, models_pb2, system_pb2, watch_pb2

if TYPE_CHECKING:  # types only: the registry and the LoRA tools import torch, which clients never load
    from lorad.captioning.editing import FolderCaptions
    from lorad.lora_tools.inspect import LoraReport
    from lorad.server.service import DaemonStatus, HeldModel
    from lorad.watching.manager import WatchChange
    from lorad.watching.records import WatchView

STATE_TO_PROTO = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
    JobState.INTERRUPTED: jobs_pb2.JOB_STATE_INTERRUPTED,
}
STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}

CAPTIONER_FROM_PROTO = {
    caption_pb2.CAPTIONER_KIND_UNSPECIFIED: "blip",
    caption_pb2.CAPTIONER_KIND_BLIP: "blip",
    caption_pb2.CAPTIONER_KIND_WD14: "wd14",
    caption_pb2.CAPTIONER_KIND_CLIP: "clip",
}
CAPTIONER_TO_PROTO = {
    "blip": caption_pb2.CAPTIONER_KIND_BLIP,
    "wd14": caption_pb2.CAPTIONER_KIND_WD14,
    "clip": caption_pb2.CAPTIONER_KIND_CLIP,
}
FORMAT_TO_PROTO = {
    "auto": caption_pb2.CAPTION_FORMAT_UNSPECIFIED,
    "csv": caption_pb2.CAPTION_FORMAT_CSV,
    "txt": caption_pb2.CAPTION_FORMAT_TXT,
}
FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}
CAPTION_STATUS_TO_PROTO = {
    cu.CAPTIONED: caption_pb2.CAPTION_STATUS_CAPTIONED,
    cu.KEPT: caption_pb2.CAPTION_STATUS_KEPT,
    cu.FAILED: caption_pb2.CAPTION_STATUS_FAILED,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    """A unix time as a protobuf Timestamp (None stays unset)."""
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def progress_to_proto(progress: Mapping[str, float]) -> jobs_pb2.Progress:
    return jobs_pb2.Progress(
        step=int(progress.get("step", 0)),
        total_steps=int(progress.get("total_steps", 0)),
        epoch=int(progress.get("epoch", 0)),
        loss=float(progress.get("loss", 0.0)),
        lr=float(progress.get("lr", 0.0)),
        steps_per_second=float(progress.get("steps_per_second", 0.0)),
        eta_seconds=float(progress.get("eta_seconds", 0.0)),
    )


def job_to_proto(job: JobRecord, *, queue_position: int = 0) -> jobs_pb2.Job:
    """A job record as the API's Job message."""
    message = jobs_pb2.Job(
        job_id=job.job_id,
        name=job.name,
        state=STATE_TO_PROTO[job.state],
        config_yaml=job.config_yaml,
        base_dir=job.base_dir,
        base_model=job.base_model,
        output_dir=job.output_dir,
        outputs=dict(job.outputs),
        error=job.error,
        hint=job.hint,
        queue_position=queue_position,
        attempt=job.attempt,
        checkpoint=job.checkpoint,
        source_name=job.source_name,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
    )
    if job.progress:
        message.progress.CopyFrom(progress_to_proto(job.progress))
    return message


def event_to_proto(record: EventRecord) -> jobs_pb2.JobEvent:
    """A history row as a JobEvent; the row's kind names the oneof field it fills."""
    event = jobs_pb2.JobEvent(job_id=record.job_id, seq=record.seq, time=timestamp(record.time))
    payload = dict(record.payload)
    if record.kind == "step":
        event.step.progress.CopyFrom(progress_to_proto(payload))
    elif record.kind in jobs_pb2.JobEvent.DESCRIPTOR.fields_by_name:
        target = getattr(event, record.kind)
        fields = target.DESCRIPTOR.fields_by_name
        for key, value in payload.items():
            if key not in fields:
                continue  # a field a newer daemon wrote; older messages simply lack it
            if isinstance(value, Mapping):
                getattr(target, key).update({str(k): str(v) for k, v in value.items()})
            else:
                setattr(target, key, value)
        target.SetInParent()  # select the oneof even when every field has its default value
    else:
        event.log.message, event.log.level = f"{record.kind}: {json.dumps(payload)}", "info"
    return event


def engine_events_to_proto(job_id: str, events: Sequence[ev.Event]) -> list[jobs_pb2.JobEvent]:
    """Engine events a request produced, as JobEvents without a seq (the job's history numbers its own copies)."""
    now = time.time()
    return [event_to_proto(EventRecord(job_id, 0, now, *engine_event_payload(event))) for event in events]


def resident_to_proto(held: HeldModel) -> models_pb2.ResidentModel:
    """A resident model (a registry ResidentInfo and the worker that holds it) as a message."""
    info = held.info
    return models_pb2.ResidentModel(
        worker=held.worker,
        model_id=info.model_id,
        source=info.source,
        model_version=info.model_version,
        device=info.key.device,
        dtype=info.key.dtype,
        memory_bytes=info.memory_bytes,
        loaded_at=timestamp(info.loaded_at),
        last_used_at=timestamp(info.last_used_at),
        keep_alive_seconds_left=max(0.0, info.keep_alive_seconds_left),
        in_use=info.in_use,
        kind=info.key.kind,
    )


def status_to_proto(status: DaemonStatus) -> system_pb2.GetStatusResponse:
    """The service's DaemonStatus as GetStatusResponse."""
    return system_pb2.GetStatusResponse(
        version=status.version,
        started_at=timestamp(status.started_at),
        uptime_seconds=status.uptime_seconds,
        devices=[
            system_pb2.Device(
                name=d.name,
                description=d.description,
                memory_total_bytes=d.memory_total_bytes,
                memory_used_bytes=d.memory_used_bytes,
                worker=d.worker,
                worker_pid=d.worker_pid,
                worker_state=d.worker_state,
                running_job_id=d.running_job_id,
                resident_models=d.resident_models,
                resident_bytes=d.resident_bytes,
                worker_restarts=d.worker_restarts,
                worker_rss_bytes=d.worker_rss_bytes,
            )
            for d in status.devices
        ],
        queue_length=status.queue_length,
        running_job_id=status.running_job_id,
        addresses=status.addresses,
        token_required=status.token_required,
        home=status.home,
        resident_models=status.resident_models,
        pid=status.pid,
        jobs_revision=status.jobs_revision,
        running_job_ids=status.running_job_ids,
        in_process=status.in_process,
    )


def engine_event_from_proto(event: jobs_pb2.JobEvent) -> ev.Event | None:
    """The engine event a JobEvent carries, for renderers shared with in-process runs; None for
    job-level kinds (queued, started, failed, cancelled, interrupted) that callers handle."""
    kind = event.WhichOneof("kind")
    event_class = ev.event_class(kind) if kind else None
    if event_class is None:
        return None
    message = event.step.progress if kind == "step" else getattr(event, kind)
    return event_class.from_payload({field.name: _field_value(message, field) for field in message.DESCRIPTOR.fields})


def _field_value(message: Any, field: Any) -> Any:
    """A scalar field as is; a map field as a plain dict."""
    value = getattr(message, field.name)
    return dict(value) if field.message_type is not None and field.message_type.GetOptions().map_entry else value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values, keeping what JSON cannot hold (NaN, infinity) as floats, so
    config validation names the key instead of the conversion failing."""

    def value(item: struct_pb2.Value) -> Any:
        kind = item.WhichOneof("kind")
        if kind == "struct_value":
            return {key: value(inner) for key, inner in item.struct_value.fields.items()}
        if kind == "list_value":
            return [value(inner) for inner in item.list_value.values]
        if kind == "null_value" or kind is None:
            return None
        return getattr(item, kind)

    return {key: value(item) for key, item in struct.fields.items()}


def caption_options_from_proto(options: caption_pb2.CaptionOptions) -> cu_options.CaptionOptions:
    """Request options as CaptionOptions; unset (zero) fields take the defaults."""
    default = cu_options.CaptionOptions()
    return cu_options.CaptionOptions(
        max_length=options.max_length or default.max_length,
        num_beams=options.num_beams or default.num_beams,
        prompt=options.prompt,
        general_threshold=(
            options.general_threshold if options.HasField("general_threshold") else default.general_threshold
        ),
        character_threshold=(
            options.character_threshold if options.HasField("character_threshold") else default.character_threshold
        ),
        exclude_tags=tuple(options.exclude_tags),
        vocabulary=Path(options.vocabulary) if options.vocabulary else None,
        top_k=options.top_k or default.top_k,
    )


def caption_options_to_proto(options: cu_options.CaptionOptions) -> caption_pb2.CaptionOptions:
    """CaptionOptions as the request message (every field set explicitly)."""
    return caption_pb2.CaptionOptions(
        max_length=options.max_length,
        num_beams=options.num_beams,
        prompt=options.prompt,
        general_threshold=options.general_threshold,
        character_threshold=options.character_threshold,
        exclude_tags=list(options.exclude_tags),
        vocabulary=str(options.vocabulary or ""),
        top_k=options.top_k,
    )


def caption_update_to_proto(update: cu.CaptionUpdate) -> caption_pb2.CaptionImagesResponse:
    """A folder-captioning update as one message of the CaptionImages stream."""
    if isinstance(update, cu.CaptionPlanned):
        return caption_pb2.CaptionImagesResponse(
            planned=caption_pb2.CaptionPlanned(
                folder=update.folder,
                images_found=update.images_found,
                to_caption=update.to_caption,
                to_keep=update.to_keep,
                unusable=update.unusable,
                format=FORMAT_TO_PROTO[update.format],
                written_to=update.written_to,
                record_path=update.record_path,
            )
        )
    if isinstance(update, cu.CaptionerReady):
        return caption_pb2.CaptionImagesResponse(
            captioner_ready=caption_pb2.CaptionerReady(
                captioner=update.captioner,
                source=update.source,
                model_version=update.model_version,
                model_id=update.model_id,
                resident=update.resident,
                seconds=update.seconds,
            )
        )
    if isinstance(update, cu.ImageCaptioned):
        return caption_pb2.CaptionImagesResponse(
            image=caption_pb2.ImageCaption(
                path=update.path,
                status=CAPTION_STATUS_TO_PROTO[update.status],
                caption=update.caption,
                error=update.error,
                done=update.done,
                total=update.total,
            )
        )
    return caption_pb2.CaptionImagesResponse(
        finished=caption_pb2.CaptionFinished(
            folder=update.folder,
            images_found=update.images_found,
            captioned=update.captioned,
            kept=update.kept,
            failed=update.failed,
            seconds=update.seconds,
            images_per_second=update.images_per_second,
            format=FORMAT_TO_PROTO[update.format],
            written_to=update.written_to,
            record_path=update.record_path,
            stopped=update.stopped,
        )
    )


# --- watch folders -------------------------------------------------------------------------------
WATCH_STATE_TO_PROTO = {
    "idle": watch_pb2.WATCH_STATE_IDLE,
    "settling": watch_pb2.WATCH_STATE_SETTLING,
    "captioning": watch_pb2.WATCH_STATE_CAPTIONING,
    "training": watch_pb2.WATCH_STATE_TRAINING,
    "error": watch_pb2.WATCH_STATE_ERROR,
}
WATCH_MODE_TO_PROTO = {"continue": watch_pb2.WATCH_MODE_CONTINUE, "retrain": watch_pb2.WATCH_MODE_RETRAIN}
WATCH_MODE_FROM_PROTO = {watch_pb2.WATCH_MODE_UNSPECIFIED: "", **{v: k for k, v in WATCH_MODE_TO_PROTO.items()}}


def watch_to_proto(view: WatchView) -> watch_pb2.Watch:
    """A watch manager's WatchView as the API's Watch message."""
    record, policy = view.record, view.record.policy
    return watch_pb2.Watch(
        watch_id=record.watch_id,
        folder=record.folder,
        config_path=record.config_path,
        policy=watch_pb2.WatchPolicy(
            quiet_seconds=policy.quiet_seconds,
            min_new_images=policy.min_new_images,
            mode=WATCH_MODE_TO_PROTO[policy.mode],
            continue_steps=policy.continue_steps,
            publish_dir=policy.publish_dir,
            polling=policy.polling,
        ),
        state=WATCH_STATE_TO_PROTO[view.state.value],
        error=view.error,
        hint=view.hint,
        images_seen=view.images_seen,
        new_images=view.new_images,
        last_job_id=record.last_job_id,
        version=record.version,
        latest_output=record.latest_output,
        published_path=record.published_path,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(view.updated_at or record.updated_at),
        base_dir=record.base_dir,
        pending_files=view.pending_files,
    )


def watch_change_to_proto(change: WatchChange) -> watch_pb2.FollowWatchesResponse:
    """One FollowWatches item: the first list, a changed watch, or a removed watch's id."""
    if isinstance(change, list):
        return watch_pb2.FollowWatchesResponse(
            snapshot=watch_pb2.WatchList(watches=[watch_to_proto(view) for view in change])
        )
    if change.view is not None:
        return watch_pb2.FollowWatchesResponse(changed=watch_to_proto(change.view))
    return watch_pb2.FollowWatchesResponse(removed_watch_id=change.removed_id)


CAPTION_SOURCE_TO_PROTO = {
    "none": caption_pb2.CAPTION_SOURCE_NONE,
    "csv": caption_pb2.CAPTION_SOURCE_CSV,
    "sidecar": caption_pb2.CAPTION_SOURCE_SIDECAR,
}


def caption_rows_to_proto(captions: FolderCaptions) -> list[caption_pb2.CaptionRow]:
    """The entries of a FolderCaptions (``lorad.captioning.editing``) as CaptionRow messages."""
    return [
        caption_pb2.CaptionRow(
            path=entry.rel,
            caption=entry.caption,
            source=CAPTION_SOURCE_TO_PROTO[entry.source],
            generated=entry.generated,
            error=entry.error,
        )
        for entry in captions.entries
    ]


def list_captions_to_proto(captions: FolderCaptions) -> caption_pb2.ListCaptionsResponse:
    """A FolderCaptions as the ListCaptions answer."""
    return caption_pb2.ListCaptionsResponse(
        folder=str(captions.folder),
        rows=caption_rows_to_proto(captions),
        format=FORMAT_TO_PROTO[captions.format],
        written_to=captions.written_to,
    )


def set_captions_to_proto(captions: FolderCaptions) -> caption_pb2.SetCaptionsResponse:
    """The edited images (a FolderCaptions) as the SetCaptions answer."""
    return caption_pb2.SetCaptionsResponse(
        rows=caption_rows_to_proto(captions), format=FORMAT_TO_PROTO[captions.format], written_to=captions.written_to
    )


def caption_edits_from_proto(edits: Iterable[caption_pb2.CaptionEdit]) -> list[tuple[str, str]]:
    """SetCaptions edits as (image path, caption) pairs, in the request's order."""
    return [(edit.path, edit.caption) for edit in edits]


def inspect_response(report: LoraReport) -> lora_tools_pb2.InspectLoraResponse:
    """A :class:`lorad.lora_tools.inspect.LoraReport` as an InspectLoraResponse, with its text (as
    ``lorad_client.format`` renders it for every client) and its JSON (``lorad lora inspect --json``)."""
    from lorad_client.format import format_lora_report

    response = lora_tools_pb2.InspectLoraResponse(
        layout=report.layout,
        family=report.family,
        family_title=report.family_title,
        modules=report.modules,
        parameters=report.parameters,
        precision=report.precision,
        ranks=report.ranks,
        alphas=report.alphas,
        trigger_words=report.trigger_words,
        problems=[
            lora_tools_pb2.LoraProblem(kind=p.kind, message=p.message, keys=p.keys[:20]) for p in report.problems
        ],
        json=json.dumps(report.to_dict()),
        path=report.path,
        base_version=report.base_version,
        family_evidence=report.family_evidence,
        network_types=report.network_types,
        blocks=[
            lora_tools_pb2.LoraBlock(block=b.block, modules=b.modules, ranks=b.ranks, alphas=b.alphas)
            for b in report.blocks
        ],
        metadata=report.metadata,
        top_tags=[lora_tools_pb2.TagCount(tag=tag, count=count) for tag, count in report.top_tags],
    )
    response.text = format_lora_report(response)
    return response


def weighted_loras_from_proto(loras: Iterable[lora_tools_pb2.WeightedLora]) -> list[tuple[str, float]]:
    """MergeLora / BakeLora inputs as (path, weight) pairs, in the request's order; an unset weight is 1."""
    return [(lora.path, lora.weight if lora.HasField("weight") else 1.0) for lora in loras]
