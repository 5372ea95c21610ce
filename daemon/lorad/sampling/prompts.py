"""Sample prompts: kohya's prompt files (``.txt`` with inline ``--n --w --h --d --s --l --g --ss``
options, or ``.yaml``/``.json`` lists), a list in the config, and the settings each prompt ends up with.

Parsing happens once, when the config is validated, so a bad option is a config error naming the
line and the option. What a prompt leaves unset (size, steps, CFG, seed, sampler) is filled at run
time from the config's ``sample_*`` keys, whose defaults each family chooses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorad.errors import ConfigError

# Limits: far beyond a real sample, low enough that a typo cannot exhaust memory or stall training.
MAX_PROMPTS = 256
MIN_SAMPLE_SIDE = 64
MAX_SAMPLE_SIDE = 4096
MAX_SAMPLE_STEPS = 1000
MAX_CFG = 100.0
MAX_PROMPT_FILE_BYTES = 1_000_000
SIDE_MULTIPLE = 8
TRIGGER = "[trigger]"

# kohya's inline options (library/train_util.py line_to_prompt_dict), by letter → our field.
_INLINE = {"n": "negative", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg_scale", "g": "guidance"}
# The same options by the keys kohya's .json/.toml prompt files use, plus our own spellings.
_MAPPING_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative",
    "negative": "negative",
    "n": "negative",
    "width": "width",
    "w": "width",
    "height": "height",
    "h": "height",
    "seed": "seed",
    "d": "seed",
    "sample_steps": "steps",
    "steps": "steps",
    "s": "steps",
    "scale": "cfg_scale",
    "cfg_scale": "cfg_scale",
    "l": "cfg_scale",
    "guidance_scale": "guidance",
    "guidance": "guidance",
    "g": "guidance",
    "sample_sampler": "sampler",
    "sampler": "sampler",
    "ss": "sampler",
}


_OPTIONS_FIX = "use --n (negative), --w, --h, --d (seed), --s (steps), --l (CFG), --g (guidance), --ss (sampler)"


class PromptProblem(ValueError):
    """One bad prompt option: ``where`` (e.g. "line 3, --w"), what is wrong and the fix."""

    def __init__(self, where: str, message: str, fix: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.fix = where, message, fix


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt as written; None where it leaves a setting to the config's ``sample_*`` keys."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance: float | None = None  # distilled guidance (Flux's --g); families without it ignore it
    sampler: str | None = None

    def to_yaml(self) -> dict[str, Any]:
        """The mapping spelling (only the settings it sets)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, "")}


@dataclass(frozen=True)
class SamplePrompts:
    """The config's ``sample_prompts``: the prompts in order, and the file they came from (if any)."""

    prompts: tuple[SamplePrompt, ...] = ()
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def to_yaml(self) -> str | list[dict[str, Any]] | None:
        """The YAML spelling: the file's path when it came from one, else the list of mappings."""
        if self.source:
            return self.source
        return [p.to_yaml() for p in self.prompts] or None


@dataclass(frozen=True)
class SampleSettings:
    """The run's defaults for what a prompt leaves unset (from the config's ``sample_*`` keys)."""

    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: str
    seed: int  # prompt i without --d uses seed + i: fixed per prompt, so steps compare
    guidance: float | None = None
    trigger_word: str = ""


@dataclass(frozen=True)
class ResolvedPrompt:
    """One prompt with every setting decided: what a family's renderer draws."""

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg_scale: float
    sampler: str
    guidance: float | None = None


def resolve_prompts(prompts: SamplePrompts, settings: SampleSettings) -> list[ResolvedPrompt]:
    """Each prompt with the run's defaults filled in and ``[trigger]`` replaced by ``trigger_word``."""

    def trigger(text: str) -> str:
        return text.replace(TRIGGER, settings.trigger_word).strip() if TRIGGER in text else text

    return [
        ResolvedPrompt(
            index=i,
            prompt=trigger(p.prompt),
            negative=trigger(p.negative),
            width=p.width or settings.width,
            height=p.height or settings.height,
            seed=p.seed if p.seed is not None else settings.seed + i,
            steps=p.steps or settings.steps,
            cfg_scale=p.cfg_scale if p.cfg_scale is not None else settings.cfg_scale,
            sampler=p.sampler or settings.sampler,
            guidance=p.guidance if p.guidance is not None else settings.guidance,
        )
        for i, p in enumerate(prompts.prompts)
    ]


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """One line of a kohya prompt file: the prompt, then `` --x value`` options (kohya splits on " --")."""
    prompt, *options = line.split(" --")
    values: dict[str, Any] = {}
    for option in options:
        option = option.strip()
        match = re.match(r"^(ss|[a-z])(?:\s+(.*))?$", option, re.IGNORECASE | re.DOTALL)
        letter, value = (match.group(1).lower(), (match.group(2) or "").strip()) if match else (option, "")
        name = "sampler" if letter == "ss" else _INLINE.get(letter)
        if name is None:
            raise PromptProblem(f"{where}, --{letter.split(' ')[0]}", "is not an option lorad knows", _OPTIONS_FIX)
        values[name] = _option_value(name, value, f"{where}, --{letter}")
    return _checked(SamplePrompt(prompt=prompt.strip(), **values), where)


def _option_value(name: str, value: Any, where: str) -> Any:
    """A raw option value as its field's type, range-checked."""
    if name in ("negative", "sampler", "prompt"):
        if not isinstance(value, str):
            raise PromptProblem(where, f"got {value!r}", "write text")
        if name == "sampler":
            from lorad.sampling.samplers import SAMPLER_CHOICES, sampler_name

            if (known := sampler_name(value)) is None:
                raise PromptProblem(where, f"got {value!r}", "choose one of: " + ", ".join(SAMPLER_CHOICES))
            return known
        return value.strip()
    if name in ("width", "height", "seed", "steps"):
        if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
            raise PromptProblem(where, f"got {value!r}", "write a whole number, e.g. 512")
        number = int(value)
        if name in ("width", "height") and (not MIN_SAMPLE_SIDE <= number <= MAX_SAMPLE_SIDE or number % SIDE_MULTIPLE):
            fix = f"use a multiple of {SIDE_MULTIPLE} from {MIN_SAMPLE_SIDE} to {MAX_SAMPLE_SIDE}"
            raise PromptProblem(where, f"got {number}", fix)
        if name == "steps" and not 1 <= number <= MAX_SAMPLE_STEPS:
            raise PromptProblem(where, f"got {number}", f"use 1 to {MAX_SAMPLE_STEPS} steps")
        if name == "seed" and number > 2**32 - 1:
            raise PromptProblem(where, f"got {number}", "use a seed from 0 to 4294967295")
        return number
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PromptProblem(where, f"got {value!r}", "write a number, e.g. 7.5") from None
    if isinstance(value, bool) or not 0 <= number <= MAX_CFG:
        raise PromptProblem(where, f"got {value!r}", f"use a number from 0 to {MAX_CFG:g}")
    return number


def _checked(prompt: SamplePrompt, where: str) -> SamplePrompt:
    if not prompt.prompt or prompt.prompt.startswith("--"):
        raise PromptProblem(where, "has no prompt text before its options", "write the prompt first, then --options")
    return prompt


def parse_prompt_mapping(item: Mapping[str, Any], where: str) -> SamplePrompt:
    """One prompt written as a mapping (kohya's .json/.toml keys: prompt, negative_prompt, width, height,
    seed, sample_steps, scale, guidance_scale, sample_sampler; or the inline letters)."""
    values: dict[str, Any] = {}
    for key, value in item.items():
        name = _MAPPING_KEYS.get(str(key).strip().lower())
        if name is None:
            raise PromptProblem(
                f"{where}, {key}",
                "is not a prompt setting lorad knows",
                "use prompt, negative_prompt, width, height, seed, sample_steps, scale, guidance_scale, sample_sampler",
            )
        values[name] = _option_value(name, value, f"{where}, {key}")
    if "prompt" not in values:
        raise PromptProblem(where, "has no `prompt`", "add `prompt: ...`")
    return _checked(SamplePrompt(**values), where)


def parse_prompt_items(items: Sequence[Any], source: str) -> tuple[SamplePrompt, ...]:
    """A list of prompts: each a kohya line (text with --options) or a mapping. Empty lines and lines
    starting with # are skipped, as kohya does."""
    prompts: list[SamplePrompt] = []
    for number, item in enumerate(items, 1):
        where = f"{source} {'line' if source.endswith('.txt') else 'item'} {number}"
        if isinstance(item, str):
            text = item.strip()
            if not text or text.startswith("#"):
                continue
            prompts.append(parse_prompt_line(text, where))
        elif isinstance(item, Mapping):
            prompts.append(parse_prompt_mapping(item, where))
        else:
            raise PromptProblem(where, f"is {type(item).__name__}", "write a prompt as text or as a mapping")
    if len(prompts) > MAX_PROMPTS:
        raise PromptProblem(source, f"has {len(prompts)} prompts", f"use at most {MAX_PROMPTS}")
    return tuple(prompts)


def read_prompt_file(path: Path) -> tuple[SamplePrompt, ...]:
    """A prompt file: ``.txt`` (one kohya line per prompt), ``.yaml``/``.yml`` or ``.json`` (a list, or a
    mapping with a ``prompts`` list). PromptProblem naming the line or item and the option."""
    name = path.name
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise PromptProblem(name, "is larger than 1 MB", "a prompt file holds a few prompts")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptProblem(str(path), "does not exist", "fix the path, or list the prompts in the config") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PromptProblem(str(path), f"cannot be read: {err}", "save it as a UTF-8 text file") from None
    from lorad.config.yaml_text import load_yaml_text  # here: lorad.config imports this module's types

    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if suffix == ".json" else load_yaml_text(text, source=name)
        except ValueError as err:
            raise PromptProblem(name, f"is not valid JSON: {err}", "fix its syntax") from None
        except ConfigError as err:
            problem = err.problems[0]
            raise PromptProblem(name, problem.message, problem.fix) from None
        if isinstance(data, Mapping) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise PromptProblem(name, "is not a list of prompts", "write a list; each item a text or a mapping")
        return parse_prompt_items(data, name)
    if suffix not in (".txt", ""):
        raise PromptProblem(name, f"has the extension {suffix}", "use a .txt, .yaml or .json prompt file")
    return parse_prompt_items(text.splitlines(), name if suffix == ".txt" else name + ".txt")


def sample_prompts_from(value: Any, base_dir: Path) -> SamplePrompts:
    """The config's ``sample_prompts`` value (a list, one prompt as text, or a prompt file's path, relative
    to ``base_dir``) as SamplePrompts; PromptProblem naming the line (or item) and the option."""
    if isinstance(value, SamplePrompts):
        return value
    if isinstance(value, str) and Path(value.strip()).suffix.lower() in (".txt", ".yaml", ".yml", ".json"):
        path = Path(value.strip()).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        return SamplePrompts(read_prompt_file(path), source=str(path))
    if isinstance(value, str):
        return SamplePrompts(parse_prompt_items([value], "sample_prompts"))
    if isinstance(value, (list, tuple)):
        return SamplePrompts(parse_prompt_items(list(value), "sample_prompts"))
    raise PromptProblem(
        "sample_prompts",
        f"is {type(value).__name__}",
        "write a list of prompts, or the path of a .txt/.yaml prompt file",
    )
