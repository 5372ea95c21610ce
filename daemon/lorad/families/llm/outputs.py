"""After training: sample generations, the merged export, and the run summary; a stopped run's partial adapter."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorad.atomic import atomic_directory
from lorad.config.llm_schema import LlmTrainConfig
from lorad.disk_space import disk_full_as_error, ensure_room
from lorad.errors import DiskFull
from lorad.events import EventSink, LogLine
from lorad.families.llm.adapter import write_adapter

PARTIAL_ADAPTER_NAME = "adapter-partial-step{step:08d}"


@torch.no_grad()
def generate_samples(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, device: torch.device
) -> list[dict[str, str]]:
    """Greedy answers to each prompt as a user message, formatted by the run's chat template.

    Returns [{"prompt", "output", "stopped"}]: ``stopped`` is "eos" when the model ended its answer
    itself (what a well-trained adapter does), "length" when it ran out of tokens.
    """
    was_training = model.training
    model.eval()
    results = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )["input_ids"]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        stopped = "eos" if new and new[-1] == tokenizer.eos_token_id else "length"
        results.append(
            {"prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True).strip(), "stopped": stopped}
        )
    model.train(was_training)
    return results


def write_merged(model: nn.Module, adapter_name: str, tokenizer: Any, dest: Path) -> Path:
    """Write the model with the adapter merged into its weights (safetensors + tokenizer) to ``dest``.

    The merge happens on a CPU copy: the model may be resident and shared, and its base weights
    must stay bit-identical. peft's own merge is used, so DoRA and rsLoRA merge exactly.
    """
    merged = copy.deepcopy(model).to("cpu")
    for path, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A:
            module.merge(adapter_names=[adapter_name])
            parent_path, _, child = path.rpartition(".")
            parent = merged.get_submodule(parent_path) if parent_path else merged
            setattr(parent, child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    merged.config.use_cache = True
    what = f"the merged model {dest.name}/"
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values()) + 16 * 1024 * 1024
    ensure_room(dest.parent, needed, what)
    with disk_full_as_error(dest.parent, what, needed), atomic_directory(dest, user_file=True) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    del merged
    return dest


def write_partial_adapter(
    config: LlmTrainConfig,
    state: dict[str, torch.Tensor],
    lora_config: Any,
    tokenizer: Any,
    step: int,
    on_event: EventSink,
) -> Path | None:
    """Write a stopped run's adapter of its last completed ``step`` as ``adapter-partial-step<8 digits>/``
    in ``output_dir`` (PEFT layout, like ``adapter/``), so a cancelled job still leaves an adapter.
    Its checkpoint matters more: a full disk is reported as a warning and gives None."""
    dest = config.output_dir / PARTIAL_ADAPTER_NAME.format(step=step)
    try:
        return write_adapter(dest, state, lora_config, tokenizer, save_precision=config.save_precision)
    except DiskFull as err:
        on_event(LogLine(message=f"no partial adapter written: {err}", level="warning"))
        return None
