"""Detecting, reading and writing the LoRA layouts: kohya, diffusers, PEFT and ComfyUI.

- **kohya** (A1111, Forge, ComfyUI, kohya's scripts): ``lora_unet_…`` / ``lora_te…`` module names
  with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; ``ss_*`` metadata.
- **diffusers** (``pipe.load_lora_weights``): ``unet.<path>.lora_A.weight`` / ``text_encoder.<path>…``,
  alpha in the ``lora_adapter_metadata`` JSON (per part: ``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``), as diffusers' own serializer writes it.
- **PEFT** (``PeftModel.from_pretrained``): a folder with ``adapter_config.json`` and
  ``adapter_model.safetensors`` (keys under ``base_model.model.``), one per model part (``unet/``,
  ``text_encoder/``) for image models.
- **ComfyUI**'s generic layout: the checkpoint's own module names, ``diffusion_model.<LDM path>`` and
  ``text_encoders.clip_l.transformer.<path>``, with kohya's ``lora_down``/``lora_up``/``alpha``.

Reading turns module names into kohya's where the family's key map allows (always for SD 1.x/2.x);
otherwise the layout's own names are kept (``LoraFile.naming``) and only operations that need no key
map (inspect, resize, merge within the layout, bake of kohya files) apply.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorad.atomic import atomic_directory, write_with_atomic
from lorad.errors import LoraFileError
from lorad.lora_tools.base_families import BaseFamily, KeyMap, detect_family, key_map_for
from lorad.lora_tools.lora_file import LoraFile, LoraModule
from lorad.lora_tools.tensor_files import TensorReader

LAYOUTS = ("kohya", "diffusers", "peft", "comfyui")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG, PEFT_PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."
IMAGE_PARTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
# Tensor-name endings -> role. LyCORIS and DoRA roles are kept as "foreign" tensors of their module.
_ROLES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_FOREIGN = {
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w2": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "dora_scale": "dora",
    "lora_magnitude_vector": "dora",
    "lora_mid.weight": "locon (tucker)",
    "oft_blocks": "oft",
    "diff": "full",
    "diff_b": "full",
    "w_norm": "norm",
    "b_norm": "norm",
    "a1.weight": "glora",
    "a2.weight": "glora",
    "b1.weight": "glora",
    "b2.weight": "glora",
}
KOHYA_PREFIX = re.compile(r"^(lora_unet|lora_te\d?|lora_transformer|lycoris)_")


@dataclass
class _Raw:
    """Tensors grouped by module under the layout's own names."""

    modules: dict[str, dict[str, torch.Tensor]]
    foreign: dict[str, dict[str, torch.Tensor]]
    foreign_types: dict[str, str]
    unknown: dict[str, torch.Tensor]


def _group(tensors: Mapping[str, torch.Tensor], strip: str = "") -> _Raw:
    raw = _Raw({}, {}, {}, {})
    for key, tensor in tensors.items():
        name = key.removeprefix(strip)
        for suffix, role in _ROLES:
            if name.endswith(suffix):
                raw.modules.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            module, _, role = name.partition(".")
            if not KOHYA_PREFIX.match(name):
                # dotted names: the role is the last one or two parts
                for suffix in _FOREIGN:
                    if name.endswith("." + suffix):
                        module, role = name[: -len(suffix) - 1], suffix
                        break
                else:
                    raw.unknown[key] = tensor
                    continue
            if role in _FOREIGN:
                raw.foreign.setdefault(module, {})[role] = tensor
                raw.foreign_types[module] = _FOREIGN[role]
            else:
                raw.unknown[key] = tensor
    return raw


def detect_layout(keys: list[str], where: str) -> str:
    """The layout of a single file from its tensor names; LoraFileError when none fits."""
    if any(KOHYA_PREFIX.match(k) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui"
    if any(k.startswith(tuple(p + "." for p in IMAGE_PARTS)) for k in keys):
        return "diffusers"
    looks = (
        "a full checkpoint, not a LoRA"
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)
        else f"first keys: {', '.join(sorted(keys)[:3]) or 'none'}"
    )
    raise LoraFileError(
        f"{where} is not a LoRA in a layout lorad knows ({looks})",
        "lorad reads kohya (lora_unet_…), diffusers (unet.…lora_A), PEFT (base_model.model.…) and ComfyUI "
        "(diffusion_model.…) LoRA files.",
    )


def _widths(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[int | None, int | None]:
    """(text width, cross-attention context width) from the down projections' input sizes."""
    text = context = None
    for name, roles in modules.items():
        down = roles.get("down")
        if down is None or down.dim() != 2:
            continue
        if re.search(r"self_attn[._]q_proj$", name) and text is None:
            text = int(down.shape[1])
        if re.search(r"attn2[._]to_k$", name) and context is None:
            context = int(down.shape[1])
    return text, context


def _alpha_for(path: str, config: Mapping[str, object] | None) -> float | None:
    if not config:
        return None
    pattern = config.get("alpha_pattern") or {}
    assert isinstance(pattern, dict)
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return float(value)
    alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    if config.get("use_rslora"):
        # rsLoRA scales by alpha/sqrt(r); the pivot's alpha is what gives that scale as alpha/r.
        rank = int(config.get("r") or 1)
        return float(alpha) * rank / math.sqrt(rank)
    return float(alpha)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with TensorReader(path) as reader:
        return {k: reader.read(k) for k in reader.names()}, reader.metadata


def read_lora(path: Path, key_map: KeyMap | None = None) -> LoraFile:
    """Read a LoRA file (or a PEFT/diffusers folder) in any known layout; LoraFileError names what is wrong.

    ``key_map`` replaces the family's registered one (for architectures other than the shipped configs).
    """
    path = Path(path)
    if not path.exists():
        raise LoraFileError(f"{path} does not exist", "Check the path.")
    if path.is_dir():
        return _read_folder(path, key_map)
    tensors, metadata = _read_safetensors(path)
    layout = detect_layout(list(tensors), str(path))
    if layout == "peft":
        return _from_raw(path, "peft", _group(tensors, PEFT_PREFIX), metadata, part_configs={}, key_map=key_map)
    if layout == "diffusers":
        configs: dict[str, dict] = {}
        if DIFFUSERS_METADATA_KEY in metadata:
            try:
                packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
            except ValueError:
                packed = {}
            for key, value in packed.items():
                part, _, field_name = key.partition(".")
                configs.setdefault(part, {})[field_name] = value
        return _from_raw(path, "diffusers", _group(tensors), metadata, part_configs=configs, key_map=key_map)
    return _from_raw(path, layout, _group(tensors), metadata, part_configs={}, key_map=key_map)


def _read_folder(path: Path, key_map: KeyMap | None) -> LoraFile:
    if (path / DIFFUSERS_WEIGHT_NAME).is_file():
        return read_lora(path / DIFFUSERS_WEIGHT_NAME, key_map)
    folders = (
        [path] if (path / PEFT_CONFIG).is_file() else sorted(p for p in path.iterdir() if (p / PEFT_CONFIG).is_file())
    )
    if not folders:
        raise LoraFileError(
            f"{path} is a folder without {PEFT_CONFIG} or {DIFFUSERS_WEIGHT_NAME}",
            "Point at a LoRA .safetensors file, a PEFT adapter folder or a diffusers LoRA folder.",
        )
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    configs: dict[str, dict] = {}
    for folder in folders:
        try:
            config = json.loads((folder / PEFT_CONFIG).read_text())
        except (OSError, ValueError) as err:
            raise LoraFileError(f"{folder / PEFT_CONFIG} cannot be read ({err})", "Check the file.") from None
        part = folder.name if folder != path else ("model" if config.get("task_type") else "unet")
        weights, meta = _read_safetensors(folder / PEFT_WEIGHTS)
        metadata |= meta
        configs[part] = config
        tensors |= {f"{part}.{k.removeprefix(PEFT_PREFIX)}": v for k, v in weights.items()}
    lora = _from_raw(path, "peft", _group(tensors), metadata, part_configs=configs, key_map=key_map)
    if "model" in configs:
        base = str(configs["model"].get("base_model_name_or_path") or "")
        lora.family = BaseFamily("llm", "adapter_config.json task_type " + str(configs["model"].get("task_type")), base)
    return lora


def _split_part(native: str) -> tuple[str, str]:
    part, _, rest = native.partition(".")
    return part, rest


def _from_raw(
    path: Path,
    layout: str,
    raw: _Raw,
    metadata: dict[str, str],
    *,
    part_configs: Mapping[str, Mapping],
    key_map: KeyMap | None,
) -> LoraFile:
    text, context = _widths(raw.modules)
    family = detect_family(list(raw.modules) + list(raw.foreign), metadata, text, context)
    if layout != "kohya" and (key_map is None or key_map.family != family.name):
        key_map = key_map_for(family.name)
    if layout == "peft" and not part_configs:  # a single adapter file: parts from the paths
        raw.modules = {
            (f"text_encoder.{n}" if n.startswith("text_model.") else f"unet.{n}"): r for n, r in raw.modules.items()
        }

    def pivot(native: str) -> str | None:
        if layout == "kohya":
            return native
        if key_map is None:
            return None
        if layout == "comfyui":
            return key_map.from_comfy(native)
        part, module_path = _split_part(native)
        if part == "text_encoder" and not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        if part not in ("unet", "text_encoder"):
            return None
        name = key_map.join(part, module_path)
        return name if key_map.split(name) is not None else None

    names = {native: pivot(native) for native in raw.modules}
    naming = "kohya" if all(n is not None for n in names.values()) else layout
    lora = LoraFile(path=path, layout=layout, family=family, modules={}, metadata=dict(metadata), naming=naming)
    for native, roles in raw.modules.items():
        name = names[native] if naming == "kohya" else native
        assert name is not None
        if "down" not in roles or "up" not in roles:
            lora.incomplete[name] = roles
            continue
        alpha = roles.get("alpha")
        if alpha is None and layout in ("diffusers", "peft"):
            part, module_path = _split_part(native)
            value = _alpha_for(module_path, part_configs.get(part))
            if value is not None:
                alpha = torch.tensor(value, dtype=roles["down"].dtype)
        lora.modules[name] = LoraModule(down=roles["down"], up=roles["up"], alpha=alpha)
    lora.foreign = raw.foreign
    lora.foreign_types = raw.foreign_types
    lora.unknown = raw.unknown
    return lora


def _require_kohya_names(lora: LoraFile, target: str) -> None:
    if lora.naming != "kohya":
        raise LoraFileError(
            f"{lora.path}: writing a {lora.family.title} LoRA from the {lora.layout} layout to the {target} layout "
            f"needs the {lora.family.title} key map, which lorad does not have yet",
            f"Keep it in the {lora.layout} layout; kohya files of this family load in A1111, Forge and ComfyUI "
            "as they are.",
        )


def _refuse_foreign(lora: LoraFile, what: str) -> None:
    if lora.foreign:
        kinds = sorted(set(lora.foreign_types.values()))
        raise LoraFileError(
            f"{lora.path} holds {', '.join(kinds)} modules, which {what} does not handle (only plain LoRA)",
            "Use a plain LoRA file; LyCORIS types are handled by LyCORIS' own tools.",
        )


def write_lora(lora: LoraFile, dest: Path, layout: str, key_map: KeyMap | None = None) -> Path:
    """Write ``lora`` to ``dest`` in ``layout`` (atomically); returns the file or folder written.

    ``key_map`` replaces the family's registered one (for architectures other than the shipped configs).
    """
    _refuse_foreign(lora, f"writing the {layout} layout")
    if layout not in LAYOUTS:
        raise LoraFileError(f"unknown layout {layout!r}", "Choose one of: " + ", ".join(LAYOUTS))
    if lora.naming != "kohya" and lora.naming != layout:
        _require_kohya_names(lora, layout)
    if layout == "kohya":
        _require_kohya_names(lora, layout)
        tensors: dict[str, torch.Tensor] = {}
        for name, module in sorted(lora.modules.items()):
            tensors[f"{name}.lora_down.weight"] = module.down
            tensors[f"{name}.lora_up.weight"] = module.up
            if module.alpha is not None:
                tensors[f"{name}.alpha"] = module.alpha
        _save(dest, tensors, lora.metadata)
        return dest
    if key_map is None or key_map.family != lora.family.name:
        key_map = key_map_for(lora.family.name)
    if lora.naming == "kohya" and key_map is None:
        raise LoraFileError(
            f"{lora.path}: writing a {lora.family.title} LoRA in the {layout} layout needs the "
            f"{lora.family.title} key map, which lorad does not have yet",
            "Keep the kohya file: A1111, Forge and ComfyUI load it as it is.",
        )
    if layout == "comfyui":
        tensors = {}
        for name, module in sorted(lora.modules.items()):
            comfy = key_map.comfy_name(name) if lora.naming == "kohya" else name
            if comfy is None:
                raise LoraFileError(
                    f"{lora.path}: module `{name}` has no ComfyUI name", "Inspect the file for keys no loader maps."
                )
            tensors[f"{comfy}.lora_down.weight"] = module.down
            tensors[f"{comfy}.lora_up.weight"] = module.up
            if module.alpha is not None:
                tensors[f"{comfy}.alpha"] = module.alpha
        _save(dest, tensors, lora.metadata)
        return dest
    parts: dict[str, dict[str, LoraModule]] = {}
    for name, module in sorted(lora.modules.items()):
        if lora.naming == "kohya":
            found = key_map.split(name)
            if found is None:
                raise LoraFileError(
                    f"{lora.path}: module `{name}` is no layer of a {lora.family.title} model",
                    "Inspect the file for keys no loader maps.",
                )
            part, module_path = found
        else:
            part, module_path = _split_part(name)
        parts.setdefault(part, {})[module_path] = module
    if layout == "diffusers":
        tensors, configs = {}, {}
        for part, modules in parts.items():
            configs[part] = _part_config(modules)
            for module_path, module in modules.items():
                tensors[f"{part}.{module_path}.lora_A.weight"] = module.down
                tensors[f"{part}.{module_path}.lora_B.weight"] = module.up
        packed = {f"{part}.{k}": v for part, config in configs.items() for k, v in config.items()}
        meta = {k: v for k, v in lora.metadata.items() if k != DIFFUSERS_METADATA_KEY}
        meta |= {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
        _save(dest, tensors, meta)
        return dest
    # PEFT: one adapter folder per part.
    from peft import LoraConfig

    with atomic_directory(dest) as tmp:
        for part, modules in parts.items():
            folder = tmp if part == "model" else tmp / part
            folder.mkdir(parents=True, exist_ok=True)
            config = _part_config(modules)
            LoraConfig(**config, inference_mode=True).save_pretrained(str(folder))
            tensors = {}
            for module_path, module in modules.items():
                if part == "text_encoder" and not clip_has_text_model_wrapper():
                    # PEFT loads by exact module path: the installed transformers' own names.
                    module_path = module_path.removeprefix("text_model.")
                tensors[f"{PEFT_PREFIX}{module_path}.lora_A.weight"] = module.down
                tensors[f"{PEFT_PREFIX}{module_path}.lora_B.weight"] = module.up
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(folder / PEFT_WEIGHTS),
                metadata={"format": "pt", **lora.metadata},
            )
    return dest


def _part_config(modules: Mapping[str, LoraModule]) -> dict[str, object]:
    """peft's LoraConfig fields for one part: the common rank and alpha, with patterns for the exceptions.

    Module names drop CLIP's ``text_model.`` wrapper: peft matches names by suffix, so the shorter name
    fits text encoders with the wrapper (transformers < 5.6) and without it (later versions) alike.
    """
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha_value for m in modules.values()).most_common(1)[0][0]

    def short(path: str) -> str:
        return path.removeprefix("text_model.")

    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {short(p): m.rank for p, m in modules.items() if m.rank != rank},
        "alpha_pattern": {short(p): m.alpha_value for p, m in modules.items() if m.alpha_value != alpha},
        "target_modules": sorted(short(p) for p in modules),
    }


@functools.lru_cache(maxsize=1)
def clip_has_text_model_wrapper() -> bool:
    """Whether the installed transformers' CLIPTextModel nests its layers under ``text_model.`` (< 5.6)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(
            CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
        )
    return any(name.startswith("text_model.") for name, _ in model.named_modules())


def _save(dest: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    data = {k: v.contiguous() for k, v in tensors.items()}
    write_with_atomic(dest, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata) or None))
