"""Regularization images (DreamBooth prior preservation), balanced against the training images as kohya does."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_CLASS_FOLDER = re.compile(r"^\d+_(.+)$")


def balanced_reg_repeats(num_train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """How many times each regularization image appears per epoch, so that the reg samples match the
    training samples (repeats included) as in kohya's ``DreamBoothDataset``: the first pass takes each reg
    image with its own repeats until there are enough; later passes add one repeat per image, in order,
    until the count reaches ``num_train_samples``. Images never reached get 0."""
    counts = [0] * len(reg_repeats)
    total, first = 0, True
    while total < num_train_samples and reg_repeats:
        for i, repeats in enumerate(reg_repeats):
            if first:
                counts[i] = repeats
                total += repeats
            else:
                counts[i] += 1
                total += 1
            if total >= num_train_samples:
                break
        first = False
    return counts


def class_captions(images: Sequence[Path], root: Path) -> Mapping[Path, str]:
    """Captions for uncaptioned regularization images: the class word of their kohya folder name
    (``1_dog`` → "dog"), else the folder's own name."""
    captions: dict[Path, str] = {}
    for path in images:
        folder = path.parent if path.parent != root else root
        match = _CLASS_FOLDER.match(folder.name)
        captions[path] = (match.group(1) if match else folder.name).replace("_", " ")
    return captions
