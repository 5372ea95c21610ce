"""``lorad lora inspect``: what a LoRA file is, what it adapts, and what is wrong with it.

The report is plain data (:class:`LoraReport`, JSON-ready with :meth:`LoraReport.to_dict`); as an
InspectLoraResponse (:func:`lorad.server.proto_convert.inspect_response`) ``lorad_client.format`` renders it
the same way for the CLI, the TUI and the WebUI. Reading never fails on a damaged file that is still a
safetensors file: NaN/inf values, missing alphas, mismatched ranks, modules missing one half and keys no
loader maps are each reported as a problem.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorad.lora_tools.base_families import key_map_for
from lorad.lora_tools.layouts import read_lora
from lorad.lora_tools.lora_file import LoraFile

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class BlockRow:
    """Modules of one block (e.g. ``unet down_blocks.0``) and their ranks/alphas."""

    block: str
    modules: int
    ranks: list[int]
    alphas: list[float]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file: ``kind`` (nan, rank_mismatch, missing_alpha, incomplete, unmapped, ...)."""

    kind: str
    message: str
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoraReport:
    """Everything ``inspect`` tells about a file."""

    path: str
    layout: str
    family: str
    family_title: str
    family_evidence: str
    base_version: str
    modules: int
    parameters: int
    precision: str
    ranks: list[int]
    alphas: list[float]
    blocks: list[BlockRow]
    network_types: dict[str, int]
    metadata: dict[str, str]
    trigger_words: list[str]
    top_tags: list[tuple[str, int]]
    problems: list[Problem]

    def to_dict(self) -> dict:
        return asdict(self)


def _block_of(name: str) -> str:
    """A readable block label for a kohya module name."""
    for pattern, label in (
        (r"lora_unet_(down_blocks|up_blocks)_(\d+)_", r"unet \1.\2"),
        (r"lora_unet_(mid_block)_", r"unet \1"),
        (r"lora_unet_(input_blocks|output_blocks)_(\d+)_", r"unet \1.\2"),
        (r"lora_unet_(middle_block)_", r"unet \1"),
        (r"lora_unet_(double_blocks|single_blocks)_(\d+)_", r"transformer \1.\2"),
        (r"lora_(te\d?)_text_model_encoder_layers_(\d+)_", r"\1 layer \2"),
        (r"lora_(te\d?)_encoder_block_(\d+)_", r"\1 block \2"),
    ):
        m = re.match(pattern, name)
        if m:
            return m.expand(label)
    m = re.match(r"(\w+)\.(?:base_model\.model\.)?(?:model\.)?(?:layers|blocks|down_blocks|up_blocks)\.(\d+)", name)
    if m:
        return f"{m[1]} {m[2]}"
    return name.split(".")[0] if "." in name else name.split("_")[1] if name.count("_") > 1 else name


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    words: list[str] = []
    if phrase := metadata.get("modelspec.trigger_phrase"):
        words += [w.strip() for w in phrase.split(",") if w.strip()]
    comment = metadata.get("ss_training_comment", "")
    if m := re.search(r"trigger word: (.+)$", comment):
        word = m[1].strip()
        if word and word != "(none)":
            words.append(word)
    return list(dict.fromkeys(words))


def _tags(metadata: dict[str, str]) -> list[tuple[str, int]]:
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if isinstance(tags, dict):
                counts.update({str(t): int(c) for t, c in tags.items() if isinstance(c, int | float)})
    return counts.most_common(10)


def _nonfinite(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def inspect_lora(path: Path) -> LoraReport:
    """Read ``path`` (any layout) and report what it is and every problem found."""
    return report_for(read_lora(Path(path)))


def report_for(lora: LoraFile) -> LoraReport:
    """The report of a LoRA already read."""
    problems: list[Problem] = []
    nan_keys = [
        f"{name}.{role}"
        for name, module in lora.modules.items()
        for role, tensor in (("down", module.down), ("up", module.up), ("alpha", module.alpha))
        if tensor is not None and _nonfinite(tensor)
    ]
    if nan_keys:
        problems.append(Problem("nan", f"{len(nan_keys)} tensors hold NaN or inf values: the LoRA is broken", nan_keys))
    mismatched = [n for n, m in lora.modules.items() if m.up.shape[1] != m.down.shape[0]]
    if mismatched:
        shapes = ", ".join(
            f"{n}: down rank {lora.modules[n].down.shape[0]} vs up rank {lora.modules[n].up.shape[1]}"
            for n in mismatched[:3]
        )
        problems.append(Problem("rank_mismatch", f"down and up ranks differ ({shapes})", mismatched))
    if lora.layout in ("kohya", "comfyui"):
        missing = [n for n, m in lora.modules.items() if m.alpha is None]
        if missing:
            problems.append(
                Problem(
                    "missing_alpha",
                    f"{len(missing)} modules have no alpha: loaders use alpha = rank (scale 1), which may not be "
                    "what training used",
                    missing,
                )
            )
    if lora.incomplete:
        problems.append(
            Problem(
                "incomplete",
                f"{len(lora.incomplete)} modules have only one of their down/up weights; loaders skip them",
                sorted(lora.incomplete),
            )
        )
    if lora.unknown:
        problems.append(
            Problem("unknown_keys", f"{len(lora.unknown)} tensors are no LoRA weight lorad knows", sorted(lora.unknown))
        )
    key_map = key_map_for(lora.family.name)
    if key_map is not None and lora.naming == "kohya":
        unmapped = sorted(n for n in lora.modules if key_map.split(n) is None)
        if unmapped:
            problems.append(
                Problem(
                    "unmapped",
                    f"{len(unmapped)} modules name no layer of a {lora.family.title} model: loaders skip them "
                    "(ComfyUI logs 'lora key not loaded')",
                    unmapped,
                )
            )
    elif lora.family.name == "unknown":
        problems.append(Problem("unknown_family", "the base model family cannot be told from the keys or metadata"))
    meta_family = lora.metadata.get("ss_base_model_version", "")
    if lora.family.version == "" and meta_family and "metadata" not in lora.family.evidence:
        problems.append(
            Problem(
                "metadata_mismatch",
                f"metadata says ss_base_model_version = {meta_family}, but the keys are a {lora.family.title} LoRA",
            )
        )
    blocks: dict[str, list] = defaultdict(list)
    for name, module in sorted(lora.modules.items()):
        blocks[_block_of(name)].append(module)
    rows = [
        BlockRow(
            block,
            len(modules),
            sorted({m.rank for m in modules}),
            sorted({round(m.alpha_value, 6) for m in modules}),
        )
        for block, modules in blocks.items()
    ]
    dtypes = Counter(
        PRECISIONS.get(m.down.dtype, str(m.down.dtype).removeprefix("torch.")) for m in lora.modules.values()
    )
    foreign_params = sum(t.numel() for roles in lora.foreign.values() for t in roles.values())
    return LoraReport(
        path=str(lora.path),
        layout=lora.layout,
        family=lora.family.name,
        family_title=lora.family.title,
        family_evidence=lora.family.evidence,
        base_version=lora.family.version,
        modules=len(lora.modules) + len(lora.foreign),
        parameters=sum(m.parameters for m in lora.modules.values()) + foreign_params,
        precision="/".join(d for d, _ in dtypes.most_common()) or "-",
        ranks=sorted(lora.ranks),
        alphas=sorted({round(m.alpha_value, 6) for m in lora.modules.values()}),
        blocks=rows,
        network_types=dict(Counter(["lora"] * len(lora.modules) + list(lora.foreign_types.values()))),
        metadata={k: v for k, v in sorted(lora.metadata.items()) if k != "ss_tag_frequency"},
        trigger_words=_trigger_words(lora.metadata),
        top_tags=_tags(lora.metadata),
        problems=problems,
    )
