"""The LLM run's LoRA: its peft config, the PEFT adapter folder it is saved as, and what serves it.

The adapter is attached by name to the (possibly resident) model with
:func:`lorad.lora.adapters.attach_lora_config`, so the model never becomes a ``PeftModel``; the
saved folder is nevertheless exactly what ``PeftModel.from_pretrained`` reads: ``adapter_config.json``
and ``adapter_model.safetensors`` with keys under ``base_model.model.``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from lorad.atomic import atomic_directory
from lorad.config.llm_schema import LlmTrainConfig
from lorad.disk_space import disk_full_as_error, ensure_room
from lorad.errors import ConfigError, ConfigProblem

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# What the common LoRA servers/converters load (vLLM, TGI/LoRAX, llama.cpp's convert_lora_to_gguf).
SERVED_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``lm_head``, ...), sorted."""
    return sorted({path.rpartition(".")[2] for path, m in model.named_modules() if isinstance(m, nn.Linear)})


def build_lora_config(config: LlmTrainConfig, model: nn.Module) -> LoraConfig:
    """The peft LoraConfig of the run: from the config, or from ``init_adapter``'s own config (its
    rank, alpha and layers must be kept for its weights to fit). Unknown layer names are a
    ConfigError listing the linear layers the model has."""
    if config.init_adapter:
        saved = json.loads((config.init_adapter / "adapter_config.json").read_text())
        targets = saved.get("target_modules") or []
        return LoraConfig(
            r=int(saved["r"]),
            lora_alpha=float(saved.get("lora_alpha", saved["r"])),
            lora_dropout=config.lora_dropout,
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            use_rslora=bool(saved.get("use_rslora", False)),
            use_dora=bool(saved.get("use_dora", False)),
            task_type="CAUSAL_LM",
            base_model_name_or_path=config.base_model,
        )
    names = linear_leaf_names(model)
    missing = [t for t in config.target_module_names if t not in names]
    if missing:
        raise ConfigError(
            [
                ConfigProblem(
                    "target_modules",
                    f"{', '.join(missing)} not found in {config.base_model}",
                    "this model's linear layers are: " + ", ".join(names),
                )
            ]
        )
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_module_names),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.base_model,
    )


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter folder's weights keyed like :func:`lorad.lora.adapters.lora_state_dict`."""
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, RuntimeError) as err:
        raise ConfigError(
            [
                ConfigProblem(
                    "init_adapter",
                    f"cannot read {folder / ADAPTER_WEIGHTS} ({err})",
                    "name a PEFT adapter folder with adapter_model.safetensors",
                )
            ]
        ) from None
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def write_adapter(
    dest: Path, state: dict[str, torch.Tensor], lora_config: LoraConfig, tokenizer: Any, *, save_precision: str
) -> Path:
    """Write the PEFT adapter folder atomically: adapter_config.json, adapter_model.safetensors, and
    the run's tokenizer (chat template included) beside them, so use formats prompts as training did."""
    dtype = SAVE_DTYPES[save_precision]
    weights = {PEFT_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    what = f"the adapter {dest.name}/"
    # The weights plus the tokenizer files beside them (a few MB for a large vocabulary).
    needed = sum(t.numel() for t in weights.values()) * dtype.itemsize + 16 * 1024 * 1024
    ensure_room(dest.parent, needed, what)
    with disk_full_as_error(dest.parent, what, needed), atomic_directory(dest, user_file=True) as tmp:
        lora_config.inference_mode = True
        lora_config.save_pretrained(str(tmp))
        lora_config.inference_mode = False
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
    return dest


def compatibility_report(lora_config: LoraConfig, *, modules_to_save: bool = False) -> dict[str, Any]:
    """Whether common LoRA servers and converters can load the adapter: warnings, never failures."""
    warnings: list[str] = []
    if lora_config.use_dora:
        warnings.append(
            "DoRA: vLLM and llama.cpp's LoRA converter do not load DoRA adapters; serve it with "
            "transformers/peft, or merge it (merge_export: true)"
        )
    if lora_config.use_rslora:
        equivalent = lora_config.lora_alpha * math.sqrt(lora_config.r)
        warnings.append(
            f"rsLoRA: servers that ignore use_rslora scale by alpha/r instead of alpha/sqrt(r) and "
            f"apply the adapter {math.sqrt(lora_config.r):.2g}x too weakly; training with use_rslora: "
            f"false and lora_alpha: {equivalent:g} gives the same scale everywhere"
        )
    if modules_to_save:
        warnings.append("modules_to_save: full copies of layers are not served by vLLM or converted by llama.cpp")
    targets = set(lora_config.target_modules or ())
    unusual = sorted(targets - SERVED_LAYERS)
    if unusual:
        warnings.append(
            f"layers {', '.join(unusual)} are outside the attention/MLP projections most servers "
            "adapt; vLLM may reject the adapter"
        )
    if lora_config.r > 16:
        warnings.append(
            f"rank {lora_config.r}: vLLM's default max_lora_rank is 16; start it with "
            f"--max-lora-rank {lora_config.r if lora_config.r in (32, 64, 128, 256) else 64}"
        )
    return {
        "peft": True,
        "vllm": not (lora_config.use_dora or unusual or modules_to_save),
        "llama_cpp_convert": not (lora_config.use_dora or modules_to_save),
        "warnings": warnings,
    }
