"""The sentence captioner: image-to-text models that transformers loads natively.

BLIP first (``BlipForConditionalGeneration``, what kohya's make_captions uses), and the families that
fit the same "processor in, generate, decode" shape: BLIP-2, GIT and Florence-2. The family is read
from the folder's config.json (``model_type``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.captioning.captioner import processor_side
from lorad.captioning.errors import CaptionModelError
from lorad.captioning.options import CaptionOptions
from lorad.config.limits import shown

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Family:
    """How one model family is run: its transformers class, and the prompt it needs when the user
    gives none (Florence-2 is steered by a task token instead of a caption prefix)."""

    model_class: str
    default_prompt: str = ""


FAMILIES: Mapping[str, Family] = {
    "blip": Family("BlipForConditionalGeneration"),
    "blip-2": Family("Blip2ForConditionalGeneration"),
    "git": Family("GitForCausalLM"),
    "florence2": Family("Florence2ForConditionalGeneration", "<MORE_DETAILED_CAPTION>"),
}


class SentenceCaptioner:
    """One loaded image-to-text model with its processor; see :class:`lorad.captioning.captioner.Captioner`.

    With a prompt, the caption continues it and starts with it ("a photo of" → "a photo of a red
    car"), as BLIP's conditional captioning does; Florence-2's task tokens are not repeated.
    """

    kind = "blip"
    max_batch = None

    def __init__(self, model: Any, processor: Any, *, family: str, source: str, device: str, dtype: str) -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.source = source
        self.model_version = family
        self.device = device
        self.dtype = dtype
        self.input_size = processor_side(processor.image_processor)
        # Two requests generating at once would only contend for the same device, and generate()
        # is not documented as thread-safe: one batch at a time.
        self._lock = threading.Lock()

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[str]:
        import torch

        if not images:
            return []
        prompt = options.prompt or FAMILIES[self.family].default_prompt
        dtype = getattr(torch, self.dtype)
        inputs = {
            name: value.to(self.device, dtype=dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in self._inputs(list(images), prompt).items()
            if name != "token_type_ids"
        }  # BERT tokenizers add them; no captioning model takes them
        with self._lock, torch.inference_mode():
            tokens = self.model.generate(
                **inputs,
                max_new_tokens=self.new_token_limit(inputs, options.max_length),
                num_beams=options.num_beams,
                do_sample=False,
            )
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def new_token_limit(self, inputs: Mapping[str, Any], wanted: int) -> int:
        """``wanted`` new tokens, clamped so prompt + caption fit the text decoder's position table
        (more would index past it: an IndexError inside generate, not a longer caption)."""
        config = self.model.config
        text_config = getattr(config, "text_config", None) or config
        table = getattr(text_config, "max_position_embeddings", None)
        if not isinstance(table, int) or table <= 0:
            return wanted
        ids = inputs.get("input_ids")
        prompt_tokens = int(ids.shape[1]) if ids is not None else 1  # the start token at least
        return max(1, min(wanted, table - prompt_tokens))

    def _inputs(self, images: list[Image.Image], prompt: str) -> Mapping[str, Any]:
        """The model's inputs: pixels, plus the prompt's tokens when there is one."""
        import torch

        if not prompt:
            return self.processor(images=images, return_tensors="pt")
        if self.family == "git":
            # GIT continues [CLS] + prompt; the processor would also close the prompt with [SEP], which
            # GIT reads as "caption finished".
            tokenizer = self.processor.tokenizer
            ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "input_ids": torch.tensor([ids] * len(images))}
        return self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")


def load_sentence_captioner(folder: Path, *, device: str, dtype: str, allow_pickle: bool = False) -> SentenceCaptioner:
    """Load the image-to-text model in ``folder`` (checked complete by
    :func:`lorad.captioning.model_folder.resolve_captioner_model`) onto ``device`` in ``dtype``.
    Weights only from safetensors unless ``allow_pickle``."""
    import json

    import torch
    import transformers

    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    family = FAMILIES.get(model_type)
    if family is None:
        raise CaptionModelError(
            f"{folder}: model_type {shown(model_type)} is not an image-to-text family lorad runs",
            f"Use a model of one of these families: {', '.join(FAMILIES)}.",
        )
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = getattr(transformers, family.model_class).from_pretrained(
        folder, local_files_only=True, use_safetensors=None if allow_pickle else True
    )
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    return SentenceCaptioner(model, processor, family=model_type, source=str(folder), device=device, dtype=dtype)
