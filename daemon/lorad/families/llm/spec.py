"""Causal language models as the registry sees it: config, detection, and where the plug-in lives."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorad.config.llm_example import render_llm_example
from lorad.config.llm_loader import parse_llm_config
from lorad.config.llm_schema import LlmTrainConfig
from lorad.families.registry import FamilySpec


def _hub_config(repo_id: str) -> Path | None:
    """The cached config.json of a hub id, never downloading."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects is simply not an LLM we know
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def is_causal_lm(base_model: str) -> bool:
    """Whether ``base_model`` (a resolved path or hub id) is a causal language model."""
    path = Path(base_model)
    config_file = path / "config.json" if path.is_dir() else (None if path.is_absolute() else _hub_config(base_model))
    if config_file is None or not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def out_of_memory_hint(config: LlmTrainConfig) -> str:
    """The LLM run's settings to lower after an out-of-memory failure, with their current values."""
    tips = []
    if config.batch_size > 1:
        tips.append(
            f"batch_size: {max(1, config.batch_size // 2)} (now {config.batch_size}) with "
            f"gradient_accumulation_steps: {config.gradient_accumulation_steps * 2}"
        )
    if not config.gradient_checkpointing:
        tips.append("gradient_checkpointing: true")
    if config.max_seq_len > 512:
        tips.append(f"max_seq_len: {config.max_seq_len // 2} (now {config.max_seq_len})")
    if not config.load_in_4bit:
        tips.append("load_in_4bit: true (QLoRA, CUDA with bitsandbytes)")
    if config.mixed_precision in ("no", "auto"):
        tips.append("mixed_precision: bf16 (or fp16 on older GPUs)")
    return "Out of memory. Try " + "; ".join(tips or ["closing other programs using the GPU"]) + "."


def preflight(config: LlmTrainConfig) -> list:
    """``lorad config --check``'s cheap look at the records and the model (built on the meta device)."""
    from lorad.families.llm.preflight import llm_preflight

    return llm_preflight(config)


SPEC = FamilySpec(
    name="llm",
    title="causal language model (Llama, Mistral, Qwen, ...)",
    config_class=LlmTrainConfig,
    parse=lambda raw, base_dir, source: parse_llm_config(raw, base_dir=base_dir, source=source),
    render_example=render_llm_example,
    detect=is_causal_lm,
    priority=10,
    plugin="lorad.families.llm.family:FAMILY",
    data_key="train_data",
    output_kind="peft_adapter",
    preflight=preflight,
    out_of_memory_hint=out_of_memory_hint,
)
