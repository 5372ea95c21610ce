"""After training: sample generations, the merged export, and the run summary."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorad.atomic import atomic_directory


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
    with atomic_directory(dest) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    del merged
    return dest
