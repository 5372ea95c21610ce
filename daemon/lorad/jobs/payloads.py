"""Engine events → (kind, payload) rows of a job's history.

Kinds are the names of the ``JobEvent.kind`` oneof in proto/lorad/v1/jobs.proto, so the gRPC
layer converts a row without knowing the engine.
"""

from __future__ import annotations

import json
from typing import Any

from lorad import events as ev


def engine_event_payload(event: ev.Event) -> tuple[str, dict[str, Any]]:
    """The history row for one engine event."""
    if isinstance(event, ev.StepDone):
        return "step", {
            "step": event.step,
            "total_steps": event.total_steps,
            "epoch": event.epoch,
            "loss": event.loss,
            "lr": event.lr,
            "steps_per_second": event.steps_per_second,
            "eta_seconds": event.eta_seconds,
        }
    if isinstance(event, ev.DataReported):
        report = event.report
        return "data_report", {
            "images_found": report.get("images_found", 0),
            "images_used": report.get("images_used", 0),
            "images_skipped": len(report.get("skipped", ())),
            "captions_generated": report.get("captions_generated", 0),
            "text": event.text,
            "report_json": json.dumps(report),
        }
    if isinstance(event, ev.ModelLoaded):
        return "model_loaded", {
            "source": event.source,
            "model_version": event.model_version,
            "seconds": event.seconds,
            "resident": event.resident,
        }
    if isinstance(event, ev.LatentsCached):
        return "latents_cached", {"cached": event.cached, "encoded": event.encoded, "seconds": event.seconds}
    if isinstance(event, ev.TrainingStarted):
        return "training_started", {
            "total_steps": event.total_steps,
            "start_step": event.start_step,
            "epochs": event.epochs,
            "trainable_params": event.trainable_params,
            "device": event.device,
            "precision": event.precision,
            "resumed_from": event.resumed_from,
            "devices": event.devices,
        }
    if isinstance(event, ev.CheckpointSaved):
        return "checkpoint_saved", {"step": event.step, "path": event.path}
    if isinstance(event, ev.LogLine):
        return "log", {"message": event.message, "level": event.level}
    if isinstance(event, ev.EvalDone):
        return "eval", {"step": event.step, "loss": event.loss, "samples": event.samples}
    if isinstance(event, ev.SampleGenerated):
        return "sample", {"prompt": event.prompt, "output": event.output, "stopped": event.stopped, "step": event.step}
    if isinstance(event, ev.SampleImage):
        return "sample_image", {
            "step": event.step,
            "prompt_index": event.prompt_index,
            "prompt": event.prompt,
            "seed": event.seed,
            "path": event.path,
            "width": event.width,
            "height": event.height,
        }
    if isinstance(event, ev.MemoryRecovered):
        return "memory_recovered", {
            "step": event.step,
            "change": event.change,
            "micro_batch": event.micro_batch,
            "gradient_accumulation_steps": event.gradient_accumulation_steps,
            "gradient_checkpointing": event.gradient_checkpointing,
            "error": event.error,
        }
    if isinstance(event, ev.TrainingFinished):
        return "finished", {
            "outputs": dict(event.outputs),
            "steps": event.steps,
            "final_loss": event.final_loss,
            "seconds": event.seconds,
        }
    return "log", {"message": f"{event.kind}: {event.to_dict()}", "level": "info"}
