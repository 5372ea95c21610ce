"""A validated request to caption one folder: what the CLI builds and the daemon receives.

Every problem in the request is reported at once (:class:`~lorad.errors.ConfigError`, each naming the
option); the model folder is resolved and checked before any image is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorad.captioning.model_folder import resolve_captioner_model
from lorad.captioning.options import DEFAULT_BATCH_SIZE, FORMATS, KINDS, CaptionOptions, option_problems
from lorad.config.limits import path_problem, shown
from lorad.config.pickle_policy import pickle_problem
from lorad.data.dataset import caption_extension_problem
from lorad.errors import ConfigError, ConfigProblem

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class CaptionRequest:
    """Caption the images in ``folder`` (absolute) with the ``captioner`` kind's model in ``model``
    (absolute, checked complete).

    ``format``: "auto" (what the folder uses), "csv" (``folder/metadata.csv``) or "txt" (sidecars
    named ``<stem><caption_extension>``). Images that already have a caption are kept, unless
    ``overwrite`` (replace every caption) or ``regenerate`` (replace captions lorad generated that
    nobody edited since). ``trigger_word`` is put first in each new caption.
    """

    folder: Path
    captioner: str
    model: Path
    options: CaptionOptions = field(default_factory=CaptionOptions)
    batch_size: int = DEFAULT_BATCH_SIZE
    trigger_word: str = ""
    format: str = "auto"
    caption_extension: str = ".txt"
    overwrite: bool = False
    regenerate: bool = False
    device: str = "auto"
    allow_pickle: bool = False


def caption_request(
    folder: str,
    *,
    base_dir: Path,
    captioner: str = "blip",
    model: str = "",
    options: CaptionOptions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    trigger_word: str = "",
    format: str = "auto",
    caption_extension: str = ".txt",
    overwrite: bool = False,
    regenerate: bool = False,
    device: str = "auto",
    allow_pickle: bool = False,
    names: Mapping[str, str] | None = None,
    source: str = "caption request",
) -> CaptionRequest:
    """Validate and resolve a caption request. Relative paths (folder, model, vocabulary) resolve
    against ``base_dir``; ``names`` maps option names to the caller's spelling (``--model``) for
    messages. Raises ConfigError listing every problem, or CaptionModelError for the model folder.
    """
    names = dict(names or {})
    options = options or CaptionOptions()
    problems: list[ConfigProblem] = []

    def name(key: str) -> str:
        return names.get(key, key)

    texts = {"folder": folder, "model": model, "vocabulary": str(options.vocabulary or ""), "base_dir": str(base_dir)}
    problems += [p for key, text in texts.items() if (p := path_problem(name(key), text)) is not None]
    if problems:  # nothing below may touch the disk with such a path
        raise ConfigError(problems, source)
    root = _absolute(folder, base_dir) if folder.strip() else None
    if root is None:
        problems.append(ConfigProblem(name("folder"), "is empty", "name the folder that holds your images"))
    elif not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        problems.append(ConfigProblem(name("folder"), f"{root} {what}", "name the folder that holds your images"))
    elif root == Path(root.anchor):
        problems.append(
            ConfigProblem(name("folder"), f"{root} is the root of the file system", "name the folder of your images")
        )
    kind = captioner.strip().lower()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        problems.append(
            ConfigProblem(
                name("captioner"),
                f"got {shown(captioner)}",
                (f"did you mean `{close[0]}`? " if close else "") + "choose one of: " + ", ".join(KINDS),
            )
        )
    fmt = format.strip().lower() or "auto"
    if fmt not in FORMATS:
        problems.append(ConfigProblem(name("format"), f"got {shown(format)}", "choose one of: " + ", ".join(FORMATS)))
    if not _DEVICE.match(device.strip().lower() or "auto"):
        problems.append(ConfigProblem(name("device"), f"got {shown(device)}", "use auto, cpu, cuda, cuda:N or mps"))
    extension = caption_extension.strip() or ".txt"
    extension = extension if extension.startswith(".") else "." + extension
    if (why := caption_extension_problem(extension)) is not None:
        problems.append(
            ConfigProblem(
                name("caption_extension"), f"{shown(caption_extension)} {why}", "use an extension such as .txt"
            )
        )
    if overwrite and regenerate:
        problems.append(
            ConfigProblem(
                name("regenerate"),
                "is given with overwrite",
                "overwrite already replaces every caption; give one of the two",
            )
        )
    if options.vocabulary is not None:
        options = dataclasses.replace(options, vocabulary=_absolute(str(options.vocabulary), base_dir))
    problems += option_problems(options, batch_size=batch_size, names=names)
    if problems:
        raise ConfigError(problems, source)
    assert root is not None  # a missing folder is a problem above
    resolved = resolve_captioner_model(kind, model, base_dir=base_dir, key=name("model"))
    if (problem := pickle_problem(name("model"), str(resolved), allow_pickle)) is not None:
        raise ConfigError([problem], source)
    return CaptionRequest(
        folder=root,
        captioner=kind,
        model=resolved,
        options=options,
        batch_size=batch_size,
        trigger_word=trigger_word.strip(),
        format=fmt,
        caption_extension=extension,
        overwrite=overwrite,
        regenerate=regenerate,
        device=device.strip().lower() or "auto",
        allow_pickle=allow_pickle,
    )


def _absolute(value: str, base_dir: Path) -> Path:
    path = Path(value.strip()).expanduser()
    return (path if path.is_absolute() else Path(base_dir) / path).resolve()
