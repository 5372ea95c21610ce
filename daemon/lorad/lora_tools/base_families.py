"""Which base model a LoRA file was made for, from its key names, shapes and metadata.

Key names decide the family (they cannot lie about which layers a file adapts): kohya's SDXL files
name U-Net blocks the SGM way (``input_blocks_``/``middle_block_``/``output_blocks_``) and have two
text encoders (``lora_te1_``/``lora_te2_``); Flux files name BFL blocks (``double_blocks_``/
``single_blocks_``); SD 1.x/2.x files use diffusers' U-Net names (``down_blocks_``/``mid_block_``/
``up_blocks_``) and ``lora_te_``. Within SD 1.x/2.x the text width tells the version (768: CLIP-L, SD 1.x;
1024: OpenCLIP-H, SD 2.x); files too small to tell (tiny test models) fall back on kohya's metadata
(``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``).

Each family may register a :class:`KeyMap` (how its module names read in each layout); SD 1.x/2.x
registers one in :mod:`lorad.lora_tools.sd_key_map`. Families whose key map lives elsewhere (SDXL, Flux)
plug in with :func:`register_key_map`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

FAMILY_TITLES: Mapping[str, str] = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "flux": "FLUX.1",
    "llm": "causal language model",
    "unknown": "unknown base model",
}
# kohya's ss_base_model_version and SAI modelspec.architecture values, by family.
_VERSION_NAMES = (
    (re.compile(r"^(sd_v1|sd_v1_5|stable-diffusion-v1)"), "sd1"),
    (re.compile(r"^(sd_v2|stable-diffusion-v2)"), "sd2"),
    (re.compile(r"^(sdxl|stable-diffusion-xl)"), "sdxl"),
    (re.compile(r"^(flux|chroma)"), "flux"),
)


@dataclass(frozen=True)
class BaseFamily:
    """The base model a file is for: ``name`` (sd1, sd2, sdxl, flux, unknown) and how that was decided."""

    name: str
    evidence: str
    version: str = ""  # the metadata's own version string, when there is one (e.g. "sd_v1", "sdxl_base_v1-0")

    @property
    def title(self) -> str:
        return FAMILY_TITLES.get(self.name, self.name)


class KeyMap(Protocol):
    """How one family's LoRA module names read in each layout. Names are kohya's (the pivot)."""

    family: str

    def split(self, kohya_name: str) -> tuple[str, str] | None:
        """(part, module path) in diffusers/transformers naming, e.g. ("unet", "down_blocks.0...to_q");
        None when the name is no module of this family's models."""

    def join(self, part: str, path: str) -> str:
        """The kohya name of ``path`` in ``part``."""

    def comfy_name(self, kohya_name: str) -> str | None:
        """ComfyUI's generic module name (``diffusion_model.…`` / ``text_encoders.…``), or None."""

    def from_comfy(self, comfy_name: str) -> str | None:
        """The kohya name for a ComfyUI module name, or None."""


KEY_MAPS: dict[str, Callable[[], KeyMap]] = {}


def register_key_map(family: str, factory: Callable[[], KeyMap]) -> None:
    """Make ``factory()`` the key map of ``family`` (called once per use; cache inside if costly)."""
    KEY_MAPS[family] = factory


def key_map_for(family: str) -> KeyMap | None:
    """The registered key map of ``family``, or None."""
    if not KEY_MAPS:
        from lorad.lora_tools import sd_key_map  # noqa: F401 - registers sd1/sd2
    factory = KEY_MAPS.get(family)
    return factory() if factory else None


def family_from_metadata(metadata: Mapping[str, str]) -> BaseFamily | None:
    """The family kohya's or SAI's metadata names, if any."""
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return BaseFamily("sd2", "metadata ss_v2 = True", metadata.get("ss_base_model_version", "sd_v2"))
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(key, "")).strip().lower()
        for pattern, family in _VERSION_NAMES:
            if value and pattern.match(value):
                return BaseFamily(family, f"metadata {key} = {metadata[key]}", metadata[key])
    return None


def family_from_names(names: Sequence[str]) -> str | None:
    """ "sd", "sdxl" or "flux" from kohya/diffusers/ComfyUI key names; None when nothing tells."""
    joined = "\n".join(names)
    if re.search(r"(^|\n)lora_te[12]_|lora_unet_(input_blocks|middle_block|output_blocks)_", joined):
        return "sdxl"
    if re.search(r"(^|\n)text_encoder_2\.|text_encoders\.clip_g\.", joined):
        return "sdxl"
    if re.search(r"double_blocks[._]\d|single_blocks[._]\d|single_transformer_blocks\.", joined):
        return "flux"
    if re.search(r"(^|\n)(lora_unet_(down_blocks|mid_block|up_blocks)_|lora_te_|unet\.|text_encoder\.)", joined):
        return "sd"
    if re.search(r"(^|\n)diffusion_model\.(input_blocks|middle_block|output_blocks)\.", joined):
        # ComfyUI's generic names: SD 1.x/2.x and SDXL share them; SDXL's first attention is at input_blocks 4.
        return "sdxl" if not re.search(r"diffusion_model\.input_blocks\.[12]\.1\.", joined) else "sd"
    return None


def detect_family(
    names: Sequence[str], metadata: Mapping[str, str], text_width: int | None, context_width: int | None
) -> BaseFamily:
    """The file's base family. ``names`` are its module names; ``text_width`` the in-width of a text-encoder
    attention projection and ``context_width`` that of a U-Net cross-attention key projection, when present."""
    by_names = family_from_names(names)
    by_meta = family_from_metadata(metadata)
    if by_names in ("sdxl", "flux"):
        version = by_meta.version if by_meta and by_meta.name == by_names else ""
        return BaseFamily(by_names, "key names", version)
    if by_names == "sd":
        width = context_width or text_width
        if width in (768, 1024):
            name = "sd1" if width == 768 else "sd2"
            version = by_meta.version if by_meta and by_meta.name == name else ""
            return BaseFamily(name, f"key names and {width}-wide text features", version)
        if by_meta and by_meta.name in ("sd1", "sd2"):
            return BaseFamily(by_meta.name, f"key names and {by_meta.evidence}", by_meta.version)
        return BaseFamily("sd1", "key names (SD 1.x/2.x layout; version assumed 1.x: no metadata or known width)")
    if by_meta:
        return by_meta
    return BaseFamily("unknown", "neither key names nor metadata name a known base model")
