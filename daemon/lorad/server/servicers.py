"""gRPC servicers: convert the request, make one call into the service, convert the answer back.

Errors never get handled here one by one: :func:`rpc_errors` maps every lorad error through
``lorad.server.status_codes`` and turns anything unexpected into INTERNAL without killing the daemon.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc

from lorad.captioning.options import DEFAULT_BATCH_SIZE
from lorad.errors import LoradError
from lorad.jobs.records import JobRecord
from lorad.server.lora_files import LoraFileService
from lorad.server.proto_convert import (
    CAPTIONER_FROM_PROTO,
    FORMAT_FROM_PROTO,
    STATE_FROM_PROTO,
    WATCH_MODE_FROM_PROTO,
    caption_edits_from_proto,
    caption_options_from_proto,
    caption_update_to_proto,
    engine_events_to_proto,
    event_to_proto,
    inspect_response,
    job_to_proto,
    list_captions_to_proto,
    resident_to_proto,
    set_captions_to_proto,
    status_to_proto,
    struct_to_dict,
    watch_change_to_proto,
    watch_to_proto,
    weighted_loras_from_proto,
)
from lorad.server.service import LoradService
from lorad.server.status_codes import fit_trailer, message_for, status_for
from lorad_api.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    jobs_pb2,
    lora_tools_pb2,
    lora_tools_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    watch_pb2,
    watch_pb2_grpc,
)
from lorad_client.identity import MAX_CHALLENGE_BYTES, MIN_CHALLENGE_BYTES, identity_proof

log = logging.getLogger("lorad.server.servicers")


@contextlib.contextmanager
def rpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Abort the RPC with the mapped status for lorad errors; INTERNAL (logged) for bugs."""
    try:
        yield
    except LoradError as err:
        context.abort(status_for(err), message_for(err))
    except Exception as err:
        # An RPC the body aborted itself (context.abort) already carries its status: let it through.
        if isinstance(err, grpc.RpcError) or context.code() not in (None, grpc.StatusCode.OK):
            raise
        log.exception("unexpected error in an RPC")
        context.abort(grpc.StatusCode.INTERNAL, fit_trailer(f"internal error: {type(err).__name__}: {err}"))


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, service: LoradService) -> None:
        self.service = service

    def _job(self, job: JobRecord) -> jobs_pb2.Job:
        return job_to_proto(job, queue_position=self.service.queue_position(job.job_id))

    def SubmitTraining(
        self, request: training_pb2.SubmitTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.SubmitTrainingResponse:
        with rpc_errors(context):
            form = request.WhichOneof("config")
            fields = struct_to_dict(request.config_fields) if form == "config_fields" else None
            job = self.service.submit(
                config_yaml=request.config_yaml if form == "config_yaml" else None,
                config_fields=fields,
                base_dir=request.base_dir,
                source_name=request.source_name,
                keep_alive_seconds=request.keep_alive_seconds,
            )
            return training_pb2.SubmitTrainingResponse(job=self._job(job))

    def GetJob(self, request: training_pb2.GetJobRequest, context: grpc.ServicerContext) -> training_pb2.GetJobResponse:
        with rpc_errors(context):
            return training_pb2.GetJobResponse(job=self._job(self.service.get_job(request.job_id)))

    def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> training_pb2.ListJobsResponse:
        with rpc_errors(context):
            states = [STATE_FROM_PROTO[s] for s in request.states if s in STATE_FROM_PROTO]
            jobs = self.service.list_jobs(states, request.limit)
            return training_pb2.ListJobsResponse(jobs=[self._job(j) for j in jobs])

    def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> training_pb2.CancelJobResponse:
        with rpc_errors(context):
            return training_pb2.CancelJobResponse(job=self._job(self.service.cancel(request.job_id)))

    def SampleNow(
        self, request: training_pb2.SampleNowRequest, context: grpc.ServicerContext
    ) -> training_pb2.SampleNowResponse:
        with rpc_errors(context):
            events = self.service.sample_now(request.job_id)
            return training_pb2.SampleNowResponse(events=engine_events_to_proto(request.job_id, events))

    def SaveNow(
        self, request: training_pb2.SaveNowRequest, context: grpc.ServicerContext
    ) -> training_pb2.SaveNowResponse:
        with rpc_errors(context):
            events = self.service.save_now(request.job_id)
            return training_pb2.SaveNowResponse(events=engine_events_to_proto(request.job_id, events))

    def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[training_pb2.WatchJobResponse]:
        with rpc_errors(context):
            job, events = self.service.watch(
                request.job_id, after_seq=request.after_seq, active=context.is_active, history_only=request.history_only
            )
            context.add_callback(self.service.hub.wake)  # a client that leaves frees its thread at once
            yield training_pb2.WatchJobResponse(job=self._job(job))
            for record in events:
                yield training_pb2.WatchJobResponse(event=event_to_proto(record))


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: LoradService) -> None:
        self.service = service

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        with rpc_errors(context):
            return models_pb2.ListModelsResponse(models=[resident_to_proto(m) for m in self.service.list_models()])

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.LoadModelResponse:
        with rpc_errors(context):
            info, already = self.service.load_model(
                base_model=request.base_model,
                base_dir=request.base_dir,
                device=request.device,
                mixed_precision=request.mixed_precision,
                model_config_dir=request.model_config_dir,
                tokenizer_path=request.tokenizer_path,
                prediction_type=request.prediction_type,
                allow_pickle=request.allow_pickle,
                keep_alive_seconds=request.keep_alive_seconds,
            )
            return models_pb2.LoadModelResponse(model=resident_to_proto(info), already_resident=already)

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        with rpc_errors(context):
            return models_pb2.UnloadModelResponse(freed_bytes=self.service.unload_model(request.model))


class CaptionServicer(caption_pb2_grpc.CaptionServiceServicer):
    def __init__(self, service: LoradService) -> None:
        self.service = service

    def CaptionImages(
        self, request: caption_pb2.CaptionImagesRequest, context: grpc.ServicerContext
    ) -> Iterator[caption_pb2.CaptionImagesResponse]:
        with rpc_errors(context):
            updates = self.service.caption_images(
                folder=request.folder,
                base_dir=request.base_dir,
                captioner=CAPTIONER_FROM_PROTO[request.captioner],
                model=request.model,
                options=caption_options_from_proto(request.options),
                batch_size=request.batch_size or DEFAULT_BATCH_SIZE,
                trigger_word=request.trigger_word,
                format=FORMAT_FROM_PROTO.get(request.format, "auto"),
                caption_extension=request.caption_extension or ".txt",
                overwrite=request.overwrite,
                regenerate=request.regenerate,
                device=request.device or "auto",
                keep_alive_seconds=request.keep_alive_seconds,
                allow_pickle=request.allow_pickle,
                active=context.is_active,
            )
            try:
                for update in updates:
                    yield caption_update_to_proto(update)
            finally:
                updates.close()  # a client that left: release the folder and the captioner now

    def ListCaptions(
        self, request: caption_pb2.ListCaptionsRequest, context: grpc.ServicerContext
    ) -> caption_pb2.ListCaptionsResponse:
        with rpc_errors(context):
            return list_captions_to_proto(
                self.service.list_captions(
                    folder=request.folder, base_dir=request.base_dir, caption_extension=request.caption_extension
                )
            )

    def SetCaptions(
        self, request: caption_pb2.SetCaptionsRequest, context: grpc.ServicerContext
    ) -> caption_pb2.SetCaptionsResponse:
        with rpc_errors(context):
            return set_captions_to_proto(
                self.service.set_captions(
                    folder=request.folder,
                    base_dir=request.base_dir,
                    edits=caption_edits_from_proto(request.edits),
                    caption_extension=request.caption_extension,
                )
            )


class SystemServicer(system_pb2_grpc.SystemServiceServicer):
    def __init__(self, service: LoradService, token: str = "") -> None:
        self.service = service
        self._token = token

    def GetStatus(
        self, request: system_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> system_pb2.GetStatusResponse:
        with rpc_errors(context):
            return status_to_proto(self.service.status())

    def ProveIdentity(
        self, request: system_pb2.ProveIdentityRequest, context: grpc.ServicerContext
    ) -> system_pb2.ProveIdentityResponse:
        size = len(request.challenge)
        if not self._token:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no token to prove")
        if not MIN_CHALLENGE_BYTES <= size <= MAX_CHALLENGE_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"`challenge`: got {size} bytes\n"
                f"hint: send {MIN_CHALLENGE_BYTES} to {MAX_CHALLENGE_BYTES} random bytes",
            )
        return system_pb2.ProveIdentityResponse(proof=identity_proof(self._token, request.challenge))


class WatchServicer(watch_pb2_grpc.WatchServiceServicer):
    def __init__(self, service: LoradService) -> None:
        self.service = service

    def AddWatch(self, request: watch_pb2.AddWatchRequest, context: grpc.ServicerContext) -> watch_pb2.AddWatchResponse:
        with rpc_errors(context):
            policy = request.policy
            view = self.service.add_watch(
                folder=request.folder,
                config_path=request.config_path,
                base_dir=request.base_dir,
                quiet_seconds=policy.quiet_seconds,
                min_new_images=policy.min_new_images,
                mode=WATCH_MODE_FROM_PROTO.get(policy.mode, str(policy.mode)),
                continue_steps=policy.continue_steps,
                publish_dir=policy.publish_dir,
                polling=policy.polling,
            )
            return watch_pb2.AddWatchResponse(watch=watch_to_proto(view))

    def RemoveWatch(
        self, request: watch_pb2.RemoveWatchRequest, context: grpc.ServicerContext
    ) -> watch_pb2.RemoveWatchResponse:
        with rpc_errors(context):
            view = self.service.remove_watch(request.watch, base_dir=request.base_dir)
            return watch_pb2.RemoveWatchResponse(watch=watch_to_proto(view))

    def ListWatches(
        self, request: watch_pb2.ListWatchesRequest, context: grpc.ServicerContext
    ) -> watch_pb2.ListWatchesResponse:
        with rpc_errors(context):
            return watch_pb2.ListWatchesResponse(watches=[watch_to_proto(v) for v in self.service.list_watches()])

    def RetryWatch(
        self, request: watch_pb2.RetryWatchRequest, context: grpc.ServicerContext
    ) -> watch_pb2.RetryWatchResponse:
        with rpc_errors(context):
            view = self.service.retry_watch(request.watch, base_dir=request.base_dir)
            return watch_pb2.RetryWatchResponse(watch=watch_to_proto(view))

    def FollowWatches(
        self, request: watch_pb2.FollowWatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[watch_pb2.FollowWatchesResponse]:
        with rpc_errors(context):
            changes = self.service.follow_watches(active=context.is_active)
            context.add_callback(self.service.watches.wake)  # a client that leaves frees its thread at once
            for change in changes:
                yield watch_change_to_proto(change)


class LoraToolsServicer(lora_tools_pb2_grpc.LoraToolsServiceServicer):
    def __init__(self, tools: LoraFileService) -> None:
        self.tools = tools

    def InspectLora(
        self, request: lora_tools_pb2.InspectLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.InspectLoraResponse:
        with rpc_errors(context):
            return inspect_response(self.tools.inspect(request.path, base_dir=request.base_dir))

    def ConvertLora(
        self, request: lora_tools_pb2.ConvertLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.ConvertLoraResponse:
        with rpc_errors(context):
            output = self.tools.convert(
                request.path, to=request.to, output=request.output, base=request.base, base_dir=request.base_dir
            )
            return lora_tools_pb2.ConvertLoraResponse(output=output)

    def ResizeLora(
        self, request: lora_tools_pb2.ResizeLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.ResizeLoraResponse:
        with rpc_errors(context):
            result = self.tools.resize(
                request.path,
                output=request.output,
                rank=request.rank or None,
                dynamic=request.dynamic,
                layout=request.layout,
                base_dir=request.base_dir,
            )
            return lora_tools_pb2.ResizeLoraResponse(output=result.output, summary=result.summary())

    def MergeLora(
        self, request: lora_tools_pb2.MergeLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.MergeLoraResponse:
        with rpc_errors(context):
            result = self.tools.merge(
                weighted_loras_from_proto(request.loras),
                output=request.output,
                rank=request.rank or None,
                layout=request.layout,
                base_dir=request.base_dir,
            )
            return lora_tools_pb2.MergeLoraResponse(
                output=result.output,
                modules=result.modules,
                ranks=result.ranks,
                kept=result.kept,
                summary=result.summary(),
            )

    def BakeLora(
        self, request: lora_tools_pb2.BakeLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.BakeLoraResponse:
        with rpc_errors(context):
            result = self.tools.bake(
                weighted_loras_from_proto(request.loras),
                base=request.base,
                output=request.output,
                base_dir=request.base_dir,
            )
            return lora_tools_pb2.BakeLoraResponse(
                output=result.output,
                modules=result.modules,
                weights_changed=result.weights_changed,
                summary=result.summary(),
            )

    def ExtractLora(
        self, request: lora_tools_pb2.ExtractLoraRequest, context: grpc.ServicerContext
    ) -> lora_tools_pb2.ExtractLoraResponse:
        with rpc_errors(context):
            result = self.tools.extract(
                request.base,
                request.tuned,
                output=request.output,
                rank=request.rank,
                conv_rank=request.conv_rank or None,
                min_diff=request.min_diff,
                layout=request.layout,
                base_dir=request.base_dir,
            )
            return lora_tools_pb2.ExtractLoraResponse(
                output=result.output,
                modules=result.modules,
                skipped_unchanged=result.skipped_unchanged,
                kept=result.kept,
                summary=result.summary(),
            )


def add_servicers(server: grpc.Server, service: LoradService, *, token: str = "") -> list[str]:
    """Register lorad's services on ``server``; returns their full names (for health and reflection).
    ``token`` is what ProveIdentity proves knowledge of."""
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(service), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(service), server)
    caption_pb2_grpc.add_CaptionServiceServicer_to_server(CaptionServicer(service), server)
    system_pb2_grpc.add_SystemServiceServicer_to_server(SystemServicer(service, token), server)
    watch_pb2_grpc.add_WatchServiceServicer_to_server(WatchServicer(service), server)
    lora_tools_pb2_grpc.add_LoraToolsServiceServicer_to_server(LoraToolsServicer(service.lora_files), server)
    return [
        training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
        models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        caption_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name,
        system_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
        watch_pb2.DESCRIPTOR.services_by_name["WatchService"].full_name,
        lora_tools_pb2.DESCRIPTOR.services_by_name["LoraToolsService"].full_name,
    ]
