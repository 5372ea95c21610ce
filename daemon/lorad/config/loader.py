"""YAML (or an equivalent mapping) → a validated :class:`TrainConfig`, with every problem at once.

Validation never stops at the first problem: each key is checked, problems are collected, and a
single :class:`ConfigError` lists them all, each naming the key, the bad value and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import math
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from lorad.config.limits import path_problem, shown
from lorad.config.option_checks import option_checks
from lorad.config.pickle_policy import pickle_problem
from lorad.config.schema import (
    MAX_DEVICES,
    MAX_REPEATS,
    REQUIRED_KEYS,
    DeviceRequest,
    OptimizerArgs,
    RepeatPolicy,
    TrainConfig,
)
from lorad.config.yaml_text import load_yaml_text
from lorad.data.dataset import caption_extension_problem
from lorad.errors import ConfigError, ConfigProblem
from lorad.sampling.prompts import SIDE_MULTIPLE, PromptProblem, SamplePrompts, sample_prompts_from

# Names other tools use for our keys, so "did you mean" can teach the mapping.
SYNONYMS: Mapping[str, str] = {
    "network_dim": "lora_rank",
    "rank": "lora_rank",
    "lora_r": "lora_rank",
    "network_alpha": "lora_alpha",
    "alpha": "lora_alpha",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "pretrained_model_name_or_path": "base_model",
    "pretrained_model": "base_model",
    "lr": "learning_rate",
    "unet_lr": "learning_rate",
    "lr_warmup": "lr_warmup_steps",
    "shuffle_captions": "shuffle_caption",
    "caption_dropout_rate": "caption_dropout",
    "save_every_n_steps": "save_steps",
    "save_last_n_steps_state": "keep_checkpoints",
    "save_total_limit": "keep_checkpoints",
    "save_model_as": "save_precision",
    "network_weights": "init_lora",
    "resume": "resume_from",
    "optimizer_type": "optimizer",
    "target_modules": "unet_target_modules",
    "instance_prompt": "trigger_word",
    "image_dir": "train_data_dir",
    "data_dir": "train_data_dir",
    "metadata": "metadata_path",
    "max_grad_norm_clip": "max_grad_norm",
    "network_dropout": "lora_dropout",
    "network_module": "network_type",
    "algo": "network_type",
    "reg_dir": "reg_data_dir",
    "alpha_mask": "masked_loss",
    "noise_offset_random_strength": "noise_offset",
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HINTS = typing.get_type_hints(TrainConfig)
C = TypeVar("C")
# Text keys that hold a path (or a hub id): checked like paths before anything touches the disk.
_PATH_TEXT_KEYS = ("base_model", "captioner_model")
# What a config key can look like; anything else is not echoed back (see convert_keys).
_KEY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class _Invalid(Exception):
    """A value that cannot be converted; carries the problem message and the fix."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


def _show(value: Any) -> str:
    """A bad value as the user wrote it, with its YAML type when that explains the problem."""
    kind = {str: "text", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )
    return f"{shown(value)} ({kind})"


def _kind(value: Any) -> str:
    """What a value is, without its content (for text that may not be a config at all)."""
    return {str: "text", list: "a list", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"got {_show(value)}", "write a whole number such as 10")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            raise _Invalid(f"got {_show(value)}", "write a whole number such as 10") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid(f"got {_show(value)}", "write a whole number such as 10")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"got {_show(value)}", "write a number such as 1e-4 or 0.0001")
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
    elif isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `2e-4` as text because it lacks a dot; accept it as a number.
        with contextlib.suppress(ValueError):
            number = float(value.strip().replace("_", ""))
    if number is None:
        raise _Invalid(f"got {_show(value)}", "write a number such as 1e-4 or 0.0001")
    # NaN passes every `<` and `>` check, and inf breaks the arithmetic downstream: refuse both here.
    if not math.isfinite(number):
        raise _Invalid(f"got {_show(value)}", "write a finite number such as 1e-4 (not NaN or infinity)")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
        return str(value).strip().lower() in _TRUE
    raise _Invalid(f"got {_show(value)}", "write true or false")


def _to_str(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        if "\0" in text:
            raise _Invalid("contains a NUL character", "remove it; config values are plain text")
        return text
    raise _Invalid(f"got {_show(value)}", "write a text value in quotes")


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise _Invalid(f"got {_show(value)}", 'write a list of names such as ["to_q", "to_v"]')
    items = [i for i in items if i]
    if not items:
        raise _Invalid("the list is empty", 'name at least one module, e.g. ["to_q", "to_v"]')
    return tuple(dict.fromkeys(items))


def _to_repeats(value: Any) -> RepeatPolicy:
    if isinstance(value, Mapping):
        per_folder: list[tuple[str, int]] = []
        default = None
        for folder, count in value.items():
            n = _to_int(count)
            if not 1 <= n <= MAX_REPEATS:
                raise _Invalid(f"folder {shown(folder)} has {shown(n)}", f"repeats must be 1 to {MAX_REPEATS:,}")
            if str(folder) == "*":
                default = n
            else:
                per_folder.append((str(folder).strip("/"), n))
        return RepeatPolicy(default=default, per_folder=tuple(per_folder))
    n = _to_int(value)
    if not 1 <= n <= MAX_REPEATS:
        raise _Invalid(f"got {shown(n)}", f"repeats must be 1 to {MAX_REPEATS:,}")
    return RepeatPolicy(default=n)


_DEVICES_FIX = "write auto, a count such as 2, or a list such as [cuda:0, cuda:1], [cpu, cpu] or [0, 1]"


def _to_devices(value: Any) -> DeviceRequest:
    """``auto``, a count (a number), one device name, or a list of device names / worker indices."""
    if isinstance(value, bool) or value is None:
        raise _Invalid(f"got {_show(value)}", _DEVICES_FIX)
    if isinstance(value, str) and value.strip().lower() == "auto":
        return DeviceRequest()
    if isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        count = _to_int(value)
        if not 1 <= count <= MAX_DEVICES:
            raise _Invalid(f"got {shown(count)}", f"ask for 1 to {MAX_DEVICES} devices")
        return DeviceRequest(count=count)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise _Invalid(f"got {_show(value)}", _DEVICES_FIX)
    if len(items) > MAX_DEVICES:
        raise _Invalid(f"names {len(items)} devices", f"ask for 1 to {MAX_DEVICES} devices")
    names: list[str] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 1024:
            names.append(str(item))
        elif isinstance(item, str) and _DEVICE.match(item.strip().lower()) and item.strip().lower() != "auto":
            names.append(item.strip().lower())
        else:
            raise _Invalid(f"{'got' if isinstance(value, str) else 'holds'} {_show(item)}", _DEVICES_FIX)
    kinds = {name.partition(":")[0] for name in names if not name.isdigit()}
    if len(kinds) > 1:
        raise _Invalid(
            f"mixes device kinds ({', '.join(sorted(kinds))})", "one job's devices must all be GPUs, or all CPU"
        )
    index_names = [name for name in names if name.isdigit() or ":" in name]
    if len(set(index_names)) < len(index_names):
        raise _Invalid("names one device twice", "name each GPU or worker once (only `cpu` may repeat)")
    return DeviceRequest(names=tuple(names))


def _literal(value: Any) -> Any:
    """A YAML value (or kohya's `key=value` text) as a Python value: numbers and tuples parsed, lists as tuples."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in (_TRUE | _FALSE) - {"1", "0"}:
            return text.lower() in _TRUE
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                return float(text.replace("_", ""))
            except ValueError:
                return text
    if isinstance(value, (list, tuple)):
        return tuple(_literal(v) for v in value)
    return value


def _to_optimizer_args(value: Any) -> OptimizerArgs:
    """A mapping ``{d_coef: 2}``, or kohya's list ``["d_coef=2", "betas=(0.9,0.99)"]``."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        pairs = [(str(k).strip(), _literal(v)) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) or (isinstance(value, str) and "=" in value):
        items = value.split() if isinstance(value, str) else value
        for item in items:
            name, eq, text = str(item).partition("=")
            if not eq or not name.strip():
                raise _Invalid(f"got {_show(item)}", 'write `name=value` items, e.g. ["d_coef=2"], or a mapping')
            pairs.append((name.strip(), _literal(text)))
    else:
        raise _Invalid(f"got {_show(value)}", 'write a mapping such as {d_coef: 2}, or a list such as ["d_coef=2"]')
    return OptimizerArgs(items=tuple(pairs))


def _resolve_path(value: Any, base_dir: Path) -> Path:
    text = _to_str(value).strip()
    if not text:
        raise _Invalid("the path is empty", "write a path, or remove the key")
    text = os.path.expandvars(text)
    if (problem := path_problem("", text)) is not None:
        raise _Invalid(problem.message, problem.fix)
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _optional_inner(hint: Any) -> Any:
    """For ``X | None`` return X; for anything else None."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def _convert(name: str, value: Any, base_dir: Path, hints: Mapping[str, Any] = _HINTS) -> Any:
    """Convert one raw value to the key's declared type (``hints``: the config class's), or raise _Invalid."""
    hint = hints[name]
    inner = _optional_inner(hint)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
            return None
        hint = inner
    if value is None:
        raise _Invalid("is empty", "give it a value, or remove the key to use the default")
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is bool:
        return _to_bool(value)
    if hint is str:
        text = _to_str(value)
        if name in _PATH_TEXT_KEYS and (problem := path_problem("", text.strip())) is not None:
            raise _Invalid(problem.message, problem.fix)
        return text
    if hint is Path:
        if name == "resume_from" and str(value).strip() == "latest":
            return Path("latest")  # resolved against output_dir below
        return _resolve_path(value, base_dir)
    if hint == tuple[str, ...]:
        if name == "caption_exclude_tags" and isinstance(value, (list, tuple)) and not value:
            return ()  # unlike a list of target layers, "exclude nothing" is a fine answer
        return _to_str_tuple(value)
    if hint is RepeatPolicy:
        return _to_repeats(value)
    if hint is OptimizerArgs:
        return _to_optimizer_args(value)
    if hint is DeviceRequest:
        return _to_devices(value)
    if hint is SamplePrompts:
        try:
            return sample_prompts_from(value, base_dir)
        except PromptProblem as bad:
            raise _Invalid(f"{bad.where}: {bad.message}", bad.fix) from None
    raise AssertionError(f"no converter for {name}: {hint}")  # a schema bug, not a user error


def _check_range(name: str, value: Any, meta: Mapping[str, Any]) -> ConfigProblem | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None and (value < lo or (meta.get("exclusive_minimum") and value == lo)):
        bound = f"greater than {lo:g}" if meta.get("exclusive_minimum") else f"at least {lo:g}"
        return ConfigProblem(name, f"got {shown(value)}", f"it must be {bound}")
    if hi is not None and value > hi:
        return ConfigProblem(name, f"got {shown(value)}", f"it must be at most {hi:g}")
    return None


def _check_choice(name: str, value: Any, meta: Mapping[str, Any]) -> tuple[Any, ConfigProblem | None]:
    choices = meta.get("choices")
    if not choices or value is None:
        return value, None
    normal = str(value).strip().lower()
    if normal in choices:
        return normal, None
    close = difflib.get_close_matches(normal, choices, n=1)
    fix = f"did you mean `{close[0]}`? " if close else ""
    return value, ConfigProblem(name, f"got {shown(value)}", fix + "choose one of: " + ", ".join(choices))


def _unknown_key_problem(key: str, known: list[str]) -> ConfigProblem:
    if key in SYNONYMS:
        return ConfigProblem(key, "unknown key", f"lorad calls this `{SYNONYMS[key]}`; rename it")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return ConfigProblem(key, "unknown key", f"did you mean `{close[0]}`?")
    return ConfigProblem(key, "unknown key", "remove it; `lorad config --example` lists every key")


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves (links followed) to a place inside ``folder``."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real.startswith(root.rstrip(os.sep) + os.sep)


def _writable_target(path: Path) -> bool:
    """Whether `path` exists as a writable folder, or could be created under a writable ancestor."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _resolve_base_model(value: str, base_dir: Path) -> str:
    """A path-like base_model becomes absolute; anything else is kept as a hub id (``org/name``)."""
    text = os.path.expandvars(value.strip())
    candidate = Path(text).expanduser()
    looks_like_path = (
        text.startswith((".", "/", "~"))
        or text.lower().endswith(_MODEL_SUFFIXES)
        or "\\" in text
        or text.count("/") != 1
    )
    if candidate.is_absolute():
        return str(candidate)
    if looks_like_path or (base_dir / candidate).exists():
        return str((base_dir / candidate).resolve())
    return text


# The longest suffix lorad adds to output_name (`-partial-step00000001.safetensors`), so every file
# named after it fits the 255-byte file-name limit of common file systems.
_NAME_SUFFIX_BYTES = len("-partial-step00000001.safetensors")
_NAME_MAX_BYTES = 255 - _NAME_SUFFIX_BYTES


def output_name_problems(name: Any) -> list[ConfigProblem]:
    """Why ``output_name`` cannot name the run's files (checked at submit, not when the export fails)."""
    if not isinstance(name, str) or not name:
        return []
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return [
            ConfigProblem(
                "output_name",
                f"got {name!r}, which holds a control character (a NUL byte, tab or line break)",
                "use a plain file name of letters, digits, `-` and `_`",
            )
        ]
    if set(name) & set('/\\:*?"<>|') or name.startswith("."):
        return [
            ConfigProblem("output_name", f"got {name!r}", "use a plain file name without folders or special characters")
        ]
    if len(name.encode("utf-8")) > _NAME_MAX_BYTES:
        return [
            ConfigProblem(
                "output_name",
                f"is {len(name.encode('utf-8'))} bytes long",
                f"use at most {_NAME_MAX_BYTES} bytes: file names made from it must fit in 255",
            )
        ]
    return []


def run_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """Checks every task's config shares: resume_from, output_dir, output_name, device."""
    problems: list[ConfigProblem] = []
    resume = values.get("resume_from")
    if isinstance(resume, Path) and resume != Path("latest") and not resume.is_dir():
        problems.append(
            ConfigProblem(
                "resume_from",
                f"{resume} is not a checkpoint folder",
                "use a folder under output_dir/checkpoints/, or `latest`",
            )
        )
    out = values.get("output_dir")
    if isinstance(out, Path):
        if out.exists() and not out.is_dir():
            problems.append(ConfigProblem("output_dir", f"{out} is a file", "choose a folder path for the outputs"))
        elif not _writable_target(out):
            problems.append(
                ConfigProblem("output_dir", f"{out} cannot be created or written", "choose a folder you can write to")
            )
    problems += output_name_problems(values.get("output_name"))
    device = values.get("device")
    if isinstance(device, str) and not _DEVICE.match(device.strip().lower()):
        problems.append(
            ConfigProblem("device", f"got {shown(device)}", "use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps")
        )
    elif isinstance(device, str) and device.strip().lower() != "auto" and values.get("devices", DeviceRequest()).names:
        problems.append(
            ConfigProblem(
                "devices",
                f"names devices, and `device` says {shown(device)} too",
                "use one of them: `devices` alone (e.g. [cuda:0, cuda:1]), or `device` with a count in `devices`",
            )
        )
    return problems


def _cross_checks(values: dict[str, Any], config_class: type = TrainConfig) -> list[ConfigProblem]:
    """Checks that involve the file system or more than one key."""
    problems: list[ConfigProblem] = []
    data_dir = values.get("train_data_dir")
    if isinstance(data_dir, Path) and not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        problems.append(
            ConfigProblem(
                "train_data_dir", f"{data_dir} {what}", "point it at the folder that holds your training images"
            )
        )
    extension = values.get("caption_extension")
    dotted = extension if not isinstance(extension, str) or extension.startswith(".") else "." + extension
    if isinstance(dotted, str) and (why := caption_extension_problem(dotted)) is not None:
        problems.append(
            ConfigProblem("caption_extension", f"{shown(extension)} {why}", "use an extension such as .txt")
        )
    metadata = values.get("metadata_path")
    if (
        values.get("captioner")
        and isinstance(metadata, Path)
        and isinstance(data_dir, Path)
        and not _within(metadata, data_dir)
    ):
        problems.append(
            ConfigProblem(
                "metadata_path",
                f"{metadata} is outside train_data_dir, and the captioner writes captions into it",
                "put it inside train_data_dir (e.g. train_data_dir/metadata.csv), or remove it to caption into "
                "sidecars",
            )
        )
    for key in ("metadata_path", "init_lora"):
        path = values.get(key)
        if (
            key == "metadata_path"
            and values.get("captioner")
            and isinstance(path, Path)
            and not path.exists()
            and _writable_target(path.parent)
        ):
            continue  # the captioner creates it with the captions it generates
        if isinstance(path, Path) and not path.is_file():
            problems.append(ConfigProblem(key, f"{path} does not exist", "fix the path, or remove the key"))
    for key in ("model_config_dir", "tokenizer_path"):
        path = values.get(key)
        if isinstance(path, Path) and not path.is_dir():
            problems.append(ConfigProblem(key, f"{path} is not a folder", "fix the path, or remove the key"))
    problems += run_checks(values)
    resolution = values.get("resolution")
    if isinstance(resolution, int) and resolution % 8:
        problems.append(
            ConfigProblem(
                "resolution", f"got {resolution}", f"use a multiple of 8, e.g. {resolution - resolution % 8 or 8}"
            )
        )
    steps = values.get("bucket_reso_steps")
    if isinstance(steps, int) and steps % 8:
        problems.append(ConfigProblem("bucket_reso_steps", f"got {steps}", "use a multiple of 8, e.g. 64"))
    else:
        problems += settle_buckets(values, config_class)
    problems += option_checks(values)
    problems += _captioner_checks(values)
    for key in ("base_model", "captioner_model"):
        model = values.get(key)
        if isinstance(model, str) and (problem := pickle_problem(key, model, values.get("allow_pickle", False))):
            problems.append(problem)
    keep, shuffle = values.get("keep_tokens"), values.get("shuffle_caption")
    if isinstance(keep, int) and keep > 0 and shuffle is False and not values.get("caption_tag_dropout_rate"):
        problems.append(
            ConfigProblem(
                "keep_tokens",
                f"is {keep} but shuffle_caption is off",
                "set shuffle_caption: true (or caption_tag_dropout_rate), or remove keep_tokens",
            )
        )
    return problems


def _default(name: str, config_class: type = TrainConfig) -> Any:
    return next(f.default for f in fields(config_class) if f.name == name)


def settle_buckets(values: dict[str, Any], config_class: type = TrainConfig) -> list[ConfigProblem]:
    """Check the bucket settings together with ``resolution``, as a run will use them (keys left unset
    take ``config_class``'s defaults: a family may give them its own).

    ``min_bucket_reso`` left unset follows a small ``resolution`` down (kohya's 256 cannot hold a
    64-pixel run's buckets), and is set in ``values``; set explicitly, every setting that leaves no
    bucket is a problem naming the keys and the values that would work.
    """
    from lorad.data.buckets import make_buckets

    resolution = values.get("resolution", _default("resolution", config_class))
    step = values.get("bucket_reso_steps", _default("bucket_reso_steps", config_class))
    if not all(isinstance(v, int) and v > 0 for v in (resolution, step)):
        return []  # already reported as a bad value
    if "min_bucket_reso" not in values:
        values["min_bucket_reso"] = max(step, min(_default("min_bucket_reso", config_class), resolution // step * step))
    lo, hi = values["min_bucket_reso"], values.get("max_bucket_reso", _default("max_bucket_reso", config_class))
    if not (isinstance(lo, int) and isinstance(hi, int)):
        return []
    problems = [
        ConfigProblem(
            key, f"{value} is not a multiple of bucket_reso_steps {step}", f"use e.g. {value // step * step or step}"
        )
        for key, value in (("min_bucket_reso", lo), ("max_bucket_reso", hi))
        if value % step
    ]
    if lo > hi:
        problems.append(
            ConfigProblem(
                "min_bucket_reso", f"{lo} is above max_bucket_reso {hi}", "make min_bucket_reso <= max_bucket_reso"
            )
        )
    elif values.get("enable_bucket", _default("enable_bucket", config_class)) and not problems:
        try:
            make_buckets(resolution, lo, hi, step)
        except ValueError:
            problems.append(
                ConfigProblem(
                    "min_bucket_reso",
                    f"{lo} leaves no bucket for resolution {resolution} (every bucket side is at least "
                    f"min_bucket_reso and its area at most resolution²)",
                    f"set min_bucket_reso to {max(step, resolution // step * step)} or less, or remove it "
                    "(it then follows resolution)",
                )
            )
    return problems


def _captioner_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """The captioner's model folder (when it is a path) is complete; its settings go together."""
    from lorad.captioning.model_folder import folder_problems

    problems: list[ConfigProblem] = []
    captioner, model = values.get("captioner"), values.get("captioner_model")
    if model and not captioner:
        problems.append(
            ConfigProblem(
                "captioner_model",
                "is set but `captioner` is not",
                "set `captioner: blip` (or wd14, clip), or remove captioner_model",
            )
        )
    if captioner and isinstance(model, str) and Path(model).is_absolute():  # hub ids are checked when used
        folder = Path(model)
        if not folder.is_dir():
            what = "is a file, not a model folder" if folder.exists() else "does not exist"
            problems.append(
                ConfigProblem(
                    "captioner_model",
                    f"{folder} {what}",
                    f"point it at a {captioner} model folder, or remove it to use the "
                    "default model from the Hugging Face cache",
                )
            )
        elif found := folder_problems(captioner, folder):
            problems.append(
                ConfigProblem(
                    "captioner_model",
                    f"{folder} is not a complete {captioner} model folder: " + "; ".join(found),
                    "point it at a complete model folder",
                )
            )
    vocabulary = values.get("caption_vocabulary")
    if isinstance(vocabulary, Path) and not vocabulary.is_file():
        problems.append(
            ConfigProblem(
                "caption_vocabulary",
                f"{vocabulary} is not a file",
                "name a text file with one phrase per line, or remove the key",
            )
        )
    return problems


def convert_keys(
    raw: Mapping[str, Any],
    specs: Mapping[str, Any],
    convert: Callable[[str, Any], Any],
    *,
    unknown: Callable[[str, list[str]], ConfigProblem] | None = None,
    free_choice: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Convert and range/choice-check every key of ``raw`` against ``specs`` (dataclass fields by name);
    return the good values and every problem. ``free_choice`` keys may hold values beyond their choices."""
    problems: list[ConfigProblem] = []
    values: dict[str, Any] = {}
    unnamed = 0
    for key, value in raw.items():
        key = str(key)
        if key not in specs:
            if _KEY_NAME.match(key):
                problems.append((unknown or _unknown_key_problem)(key, list(specs)))
            else:
                unnamed += 1
            continue
        try:
            converted = convert(key, value)
        except _Invalid as bad:
            problems.append(ConfigProblem(key, bad.message, bad.fix))
            continue
        problem = None
        if key not in free_choice:
            converted, problem = _check_choice(key, converted, specs[key].metadata)
        problem = problem or _check_range(key, converted, specs[key].metadata)
        if problem:
            problems.append(problem)
            continue
        values[key] = converted
    if unnamed:
        # Not shown: a "config" that is really some other file (a password file, a key, a token)
        # must not come back line by line in the error.
        problems.append(
            ConfigProblem(
                "",
                f"{unnamed:,} key{'s are' if unnamed != 1 else ' is'} not a config key name (not shown)",
                "keys are names such as `learning_rate`; is this file a lorad config? `lorad config --example`",
            )
        )
    return values, problems


def missing_required(
    raw: Mapping[str, Any], specs: Mapping[str, Any], required: tuple[str, ...]
) -> list[ConfigProblem]:
    """A problem for each required key that is absent or empty, with an example value."""
    return [
        ConfigProblem(key, "is required but missing", f'add e.g. `{key}: "{specs[key].metadata.get("example")}"`')
        for key in required
        if key not in raw or raw[key] in (None, "")
    ]


def finish_common(
    values: dict[str, Any], specs: Mapping[str, Any], base_dir: Path, *, default_name: str, family: str = ""
) -> None:
    """After validation: resolve base_model, normalise device, name the run, expand `resume_from: latest`,
    record the ``family`` the config is for, and fill every unset key with its default so the frozen
    object is complete and self-describing."""
    if "base_model" in values:
        values["base_model"] = _resolve_base_model(values["base_model"], base_dir)
    if "device" in values:
        values["device"] = values["device"].strip().lower()
    if family:
        values["model_family"] = family
    out_dir: Path = values["output_dir"]
    if not values.get("output_name"):
        values["output_name"] = out_dir.name or default_name
    if values.get("resume_from") == Path("latest"):
        values["resume_from"] = out_dir / "checkpoints" / "latest"
    for name, f in specs.items():
        if name not in values:
            if f.default is not MISSING:
                values[name] = f.default
            elif f.default_factory is not MISSING:
                values[name] = f.default_factory()


@functools.cache
def type_hints(config_class: type) -> Mapping[str, Any]:
    """The resolved annotations of a config class (its keys' types), computed once."""
    return typing.get_type_hints(config_class)


def require_mapping(raw: Any, source: str) -> Mapping[str, Any]:
    """``raw`` when it is a mapping of keys; a ConfigError saying what a config looks like otherwise."""
    if isinstance(raw, Mapping):
        return raw
    raise ConfigError(
        [
            ConfigProblem(
                "",
                f"the config must be a mapping of `key: value` lines, got {_kind(raw)}",
                "see `lorad config --example`",
            )
        ],
        source,
    )


def parse_family_config(
    raw: Any,
    *,
    config_class: type[C],
    family: str,
    base_dir: Path,
    source: str,
    required: tuple[str, ...],
    default_name: str,
    convert: Callable[[str, Any, Path], Any] | None = None,
    checks: Sequence[Callable[[dict[str, Any]], list[ConfigProblem]]] = (),
    unknown: Callable[[str, list[str]], ConfigProblem] | None = None,
    free_choice: tuple[str, ...] = (),
) -> C:
    """Validate ``raw`` into ``config_class`` for model family ``family``: convert and range-check every
    key (``convert(key, value, base_dir)``, default: by the key's declared type), then run each of
    ``checks`` on the converted values. Raises one ConfigError listing every problem found; never
    returns a partial config. Each family's parser is this call with its class, checks and defaults."""
    raw = require_mapping(raw, source)
    hints = type_hints(config_class)
    specs = {f.name: f for f in fields(config_class)}
    to_value = convert or (lambda key, value, base: _convert(key, value, base, hints))
    values, problems = convert_keys(
        raw, specs, lambda key, value: to_value(key, value, base_dir), unknown=unknown, free_choice=free_choice
    )
    problems += missing_required(raw, specs, required)
    for check in checks:
        problems += check(values)
    if problems:
        raise ConfigError(problems, source)
    finish_common(values, specs, base_dir, default_name=default_name, family=family)
    return config_class(**values)


def sampling_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    """Sampling keys that cannot work: a schedule without prompts, sizes that are not a multiple of 8."""
    problems = [
        ConfigProblem(
            key, "is set but sample_prompts is empty", "add sample_prompts (a list or a prompt file), or remove it"
        )
        for key in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
        if values.get(key) and not values.get("sample_prompts")
    ]
    for key in ("sample_width", "sample_height"):
        side = values.get(key)
        if isinstance(side, int) and side % SIDE_MULTIPLE:
            problems.append(
                ConfigProblem(
                    key, f"got {side}", f"use a multiple of {SIDE_MULTIPLE}, e.g. {side - side % SIDE_MULTIPLE}"
                )
            )
    return problems


def image_checks(
    base_dir: Path, config_class: type = TrainConfig
) -> list[Callable[[dict[str, Any]], list[ConfigProblem]]]:
    """The checks every image family's config gets (data folder, captions, buckets, paths, output); keys
    left unset are checked at ``config_class``'s defaults."""

    def resolve_models(values: dict[str, Any]) -> list[ConfigProblem]:
        for key in ("base_model", "captioner_model"):  # resolved before the checks look at the disk
            if values.get(key):
                values[key] = _resolve_base_model(values[key], base_dir)
        return []

    return [resolve_models, lambda values: _cross_checks(values, config_class), sampling_checks]


def parse_config(raw: Any, *, base_dir: Path, source: str = "config") -> TrainConfig:
    """Validate a mapping of config keys into a Stable Diffusion 1.x/2.x :class:`TrainConfig`.

    Relative paths resolve against ``base_dir`` (the directory the user ran the command in).
    Raises :class:`ConfigError` listing every problem found; never returns a partial config.
    """
    return parse_family_config(
        raw,
        config_class=TrainConfig,
        family="sd",
        base_dir=base_dir,
        source=source,
        required=REQUIRED_KEYS,
        default_name="lora",
        checks=image_checks(base_dir),
    )


def parse_config_text(text: str, *, base_dir: Path, source: str = "config") -> TrainConfig:
    """Parse YAML text and validate it; a YAML syntax error is reported with its line and column, and
    oversized or alias-bomb texts are refused (see :func:`lorad.config.yaml_text.load_yaml_text`)."""
    raw = load_yaml_text(text, source=source)
    if raw is None:
        raw = {}
    return parse_config(raw, base_dir=base_dir, source=source)


def load_config(path: str | os.PathLike[str], *, base_dir: Path | None = None) -> TrainConfig:
    """Read and validate a YAML config file.

    Relative paths inside resolve against ``base_dir`` (default: the current directory), as in
    ``lorad train --config configs/x.yaml`` run from the project folder.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                ConfigProblem(
                    "--config",
                    f"{path} does not exist",
                    "give the path of your YAML config; `lorad config --example > my.yaml` writes one",
                )
            ],
            str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            [ConfigProblem("--config", f"{path} cannot be read: {err}", "save the config as a UTF-8 text file")],
            str(path),
        ) from None
    return parse_config_text(text, base_dir=(base_dir or Path.cwd()).resolve(), source=str(path))
