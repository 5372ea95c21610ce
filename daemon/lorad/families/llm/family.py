"""Causal language models on the one training loop: a PEFT LoRA adapter.

The scan reads and tokenises the records (with the run's tokenizer and chat template, masking
prompts); the run attaches the adapter and computes the token cross-entropy of one micro-batch
(packed rows optional), evaluates every ``eval_steps``, answers the sample prompts at the end, and
exports the PEFT adapter folder (and, if asked, the merged model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.pickle_policy import needs_pickle
from lorad.events import EvalDone, Event, EventSink, LogLine, SampleGenerated
from lorad.families.llm.adapter import build_lora_config, compatibility_report, read_adapter_weights, write_adapter
from lorad.families.llm.model import LlmModel, RunTokenizer, load_llm, prepare_tokenizer, restore_base_llm
from lorad.families.llm.outputs import generate_samples, write_merged, write_partial_adapter
from lorad.lora.adapters import attach_lora_config, load_lora_state_dict, lora_state_dict
from lorad.lora.networks import evaluating, network_off
from lorad.models.registry import ModelKey
from lorad.textdata.batches import Batch, collate, plan_batches
from lorad.textdata.dataset import TextData, encode_samples, read_samples, split_eval
from lorad.textdata.encoding import Encoded
from lorad.training.activation_checkpointing import enable_activation_checkpointing
from lorad.training.family import ADAPTER, RunFacts, RunHooks, Scalars, ScannedData
from lorad.training.placement import Placement


@dataclass(frozen=True)
class LlmData:
    """The scan's result: the encoded records and the run's tokenizer."""

    data: TextData
    tokenizer: RunTokenizer


def forward_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's labelled tokens (the model shifts labels itself)."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
        use_cache=False,
    ).loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: tuple[Encoded, ...],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager,
    mask_dtype: torch.dtype,
) -> float:
    """Token-weighted mean loss over ``samples`` (eval mode: no dropout); NaN when there are none."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        rows = [[i] for i in range(start, min(start + batch_size, len(samples)))]
        batch = collate(samples, rows, pad_id=pad_id, packed=False, mask_dtype=mask_dtype).to(device)
        count = int((batch.labels[:, 1:] != -100).sum())
        with autocast:
            total += float(forward_loss(model, batch)) * count
        tokens += count
    model.train(was_training)
    return total / tokens if tokens else float("nan")


class LlmRun:
    """A run on one causal LM: see :class:`lorad.training.family.FamilyRun` for the contract."""

    def __init__(
        self, config: LlmTrainConfig, llm: LlmModel, data: LlmData, placement: Placement, on_event: EventSink
    ) -> None:
        self.config, self.data, self.on_event = config, data.data, on_event
        self.model = model = llm.model
        self.tokenizer, self.pad_id = data.tokenizer.tokenizer, data.tokenizer.pad_id
        self.tokenizer_notes = data.tokenizer.notes
        self.device = placement.device
        self.scalars = Scalars()
        self.lora_config = build_lora_config(config, model)
        params = attach_lora_config(model, adapter_name=ADAPTER, config=self.lora_config)
        if config.init_adapter:
            load_lora_state_dict(model, ADAPTER, read_adapter_weights(config.init_adapter))
            on_event(
                LogLine(
                    message=f"starting from the adapter in {config.init_adapter} "
                    f"(rank {self.lora_config.r}, layers {sorted(self.lora_config.target_modules)})"
                )
            )
        self.parts = {"model": model}
        # A compiled wrapper, not the resident model itself, so the next job finds the model as it was.
        self.forward_model = torch.compile(model) if config.torch_compile else model
        self.param_groups: list[dict[str, Any]] = [{"params": params, "lr": config.learning_rate}]
        self.autocast = torch.autocast(
            self.device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        # Packed rows carry a 4-D additive mask; SDPA wants it in the dtype the attention computes in.
        self.mask_dtype = placement.autocast_dtype or placement.weight_dtype
        self.eval_history: list[dict[str, float]] = []
        self.tokens = 0  # labelled and unlabelled tokens trained on in this run
        self.started = time.monotonic()

    def plan(self, epoch: int) -> Sequence[list[list[int]]]:
        config = self.config
        return plan_batches(
            self.data.train,
            epoch=epoch,
            batch_size=config.batch_size,
            seed=config.seed,
            packing=config.packing,
            max_seq_len=config.max_seq_len,
        )

    def split(self, micro_batch: list[list[int]], size: int) -> list[tuple[list[list[int]], float]]:
        # The loss is a mean over labelled tokens, so a piece's share is its part of them.
        def labelled(rows: list[list[int]]) -> int:
            return sum(self.data.train[i].trained_tokens for row in rows for i in row)

        pieces = [micro_batch[at : at + size] for at in range(0, len(micro_batch), size)]
        whole = labelled(micro_batch)
        return [(piece, labelled(piece) / whole if whole else len(piece) / len(micro_batch)) for piece in pieces]

    def loss(self, micro_batch: list[list[int]], generator: torch.Generator) -> torch.Tensor:
        batch = collate(
            self.data.train, micro_batch, pad_id=self.pad_id, packed=self.config.packing, mask_dtype=self.mask_dtype
        ).to(self.device)
        self.tokens += batch.tokens
        return forward_loss(self.forward_model, batch)

    def train_mode(self, gradient_checkpointing: bool) -> None:
        self.model.train()
        self.model.config.use_cache = False  # the KV cache only costs memory in training; restored after
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.started = time.monotonic()

    def _evaluate(self, step: int) -> None:
        if not self.data.eval:
            return
        loss = evaluate(
            self.model,
            self.data.eval,
            pad_id=self.pad_id,
            batch_size=self.config.batch_size,
            device=self.device,
            autocast=self.autocast,
            mask_dtype=self.mask_dtype,
        )
        self.eval_history.append({"step": step, "loss": loss})
        self.scalars.by_step["eval_loss"] = loss
        self.on_event(EvalDone(step=step, loss=loss, samples=len(self.data.eval)))

    def after_step(self, step: int, total_steps: int) -> None:
        self.scalars.by_step["tokens_per_second"] = self.tokens / max(time.monotonic() - self.started, 1e-9)
        if self.config.eval_steps and step % self.config.eval_steps == 0 and step < total_steps:
            self._evaluate(step)

    def finish(self, step: int) -> None:
        self.scalars.summary["tokens_per_second"] = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self._evaluate(step)
        self.scalars.summary["eval_loss"] = self.eval_history[-1]["loss"] if self.eval_history else None
        self.scalars.summary["eval_history"] = self.eval_history

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        """Greedy answers to the sample prompts after ``step`` (``baseline``: without the adapter)."""
        if not self.config.sample_prompts:
            return []
        use_cache = self.model.config.use_cache
        self.model.config.use_cache = True  # generation wants the KV cache; training turned it off
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(evaluating([self.model], ADAPTER))
                if baseline:
                    stack.enter_context(network_off([self.model], ADAPTER))
                answers = generate_samples(
                    self.model,
                    self.tokenizer,
                    self.config.sample_prompts,
                    max_new_tokens=self.config.sample_max_new_tokens,
                    device=self.device,
                )
        finally:
            self.model.config.use_cache = use_cache
        events: list[Event] = []
        for answer in answers:
            events.append(SampleGenerated(answer["prompt"], answer["output"], answer["stopped"], step=step))
            self.on_event(events[-1])
        return events

    def export_epoch(self, facts: RunFacts) -> None:
        pass  # the epoch's checkpoint holds the adapter; kohya's per-epoch files are an image-LoRA habit

    def export_partial(self, facts: RunFacts) -> Path | None:
        state = lora_state_dict(self.model, ADAPTER)
        return write_partial_adapter(self.config, state, self.lora_config, self.tokenizer, facts.steps, self.on_event)

    def export(self, facts: RunFacts) -> dict[str, str]:
        config = self.config
        if facts.variant:  # the EMA weights beside the trained ones: the adapter folder only
            folder = config.output_dir / f"adapter-{facts.variant}"
            state = lora_state_dict(self.model, ADAPTER)
            write_adapter(folder, state, self.lora_config, self.tokenizer, save_precision=config.save_precision)
            return {f"adapter_{facts.variant}": str(folder)}
        outputs = {
            "adapter": str(
                write_adapter(
                    config.output_dir / "adapter",
                    lora_state_dict(self.model, ADAPTER),
                    self.lora_config,
                    self.tokenizer,
                    save_precision=config.save_precision,
                )
            )
        }
        if config.merge_export:
            outputs["merged"] = str(write_merged(self.model, ADAPTER, self.tokenizer, config.output_dir / "merged"))
        if config.export_gguf:
            from lorad.families.llm.gguf import export_gguf

            exported = export_gguf(
                config.output_dir,
                quant=config.export_gguf,
                base_model=config.base_model,
                merged=config.merge_export,
                log=lambda line: self.on_event(LogLine(message=f"gguf: {line}")),
            )
            outputs |= {"gguf_adapter": exported.adapter, "gguf_base": exported.base, "modelfile": exported.modelfile}
            if exported.merged:
                outputs["gguf_merged"] = exported.merged
            self.on_event(LogLine(message=f"gguf: run it in Ollama: {exported.ollama_command}"))
        compatibility = compatibility_report(self.lora_config)
        for warning in compatibility["warnings"]:
            self.on_event(LogLine(message=f"compatibility: {warning}", level="warning"))
        self.model.config.use_cache = True
        samples = generate_samples(
            self.model,
            self.tokenizer,
            config.sample_prompts,
            max_new_tokens=config.sample_max_new_tokens,
            device=self.device,
        )
        for sample in samples:
            self.on_event(
                SampleGenerated(
                    prompt=sample["prompt"], output=sample["output"], stopped=sample["stopped"], step=facts.steps
                )
            )
        self.scalars.summary |= {
            "samples": samples,
            "tokenizer_notes": list(self.tokenizer_notes),
            "compatibility": compatibility,
            "lora_config": self.lora_config.to_dict(),
        }
        return outputs


class LlmFamily:
    """Causal language models: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "llm"

    def scan(self, config: LlmTrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        # Unusable files fail in milliseconds, before any weights load.
        options = {"data_format": config.data_format, "columns": dict(config.columns), "roles": dict(config.roles)}
        train_set = read_samples(config.train_data, **options)
        eval_set = read_samples(config.eval_data, key="eval_data", **options) if config.eval_data else None
        train_samples, eval_samples = (
            split_eval(train_set.samples, config.eval_fraction, config.seed)
            if not eval_set
            else (list(train_set.samples), list(eval_set.samples))
        )
        tokenizer = prepare_tokenizer(config)
        data = encode_samples(
            train_set,
            eval_samples,
            train_samples,
            tokenizer.tokenizer,
            max_seq_len=config.max_seq_len,
            eval_set=eval_set,
        )
        return ScannedData(
            report=data.report, text=data.render(), payload=LlmData(data, tokenizer), notes=tokenizer.notes
        )

    def model_key(self, config: LlmTrainConfig, placement: Placement) -> ModelKey:
        """A 4-bit (QLoRA) base is another model: its dtype reads "nf4:<compute dtype>"."""
        dtype = str(placement.weight_dtype).removeprefix("torch.")
        if config.load_in_4bit:
            dtype = "nf4:" + str(placement.autocast_dtype or "torch.float16").removeprefix("torch.")
        return ModelKey(
            base_model=config.base_model,
            device=str(placement.device),
            dtype=dtype,
            kind="llm",
            allow_pickle=needs_pickle(config.base_model, config.allow_pickle),
        )

    def load(self, key: ModelKey) -> LlmModel:
        four_bit = key.dtype.startswith("nf4:")
        dtype = getattr(torch, key.dtype.removeprefix("nf4:"))
        placement = Placement(
            device=torch.device(key.device), autocast_dtype=dtype if four_bit else None, weight_dtype=dtype
        )
        return load_llm(key.base_model, placement, load_in_4bit=four_bit, allow_pickle=key.allow_pickle)

    def start(
        self, config: LlmTrainConfig, model: LlmModel, data: ScannedData, placement: Placement, on_event: EventSink
    ) -> LlmRun:
        return LlmRun(config, model, data.payload, placement, on_event)

    def restore(self, model: LlmModel) -> None:
        restore_base_llm(model.model, ADAPTER, use_cache=model.use_cache)

    def signature(self, config: LlmTrainConfig) -> dict[str, Any]:
        keys = (
            "base_model",
            "lora_rank",
            "target_modules",
            "use_dora",
            "use_rslora",
            "batch_size",
            "gradient_accumulation_steps",
            "seed",
            "max_seq_len",
            "packing",
            "chat_template",
            "data_format",
        )
        values = config.to_dict()
        return {k: values[k] for k in keys} | {"lora_alpha": config.effective_lora_alpha}


FAMILY = LlmFamily()
