"""One round of sample images, whatever the family: each resolved prompt drawn by the family's renderer
from its own seeded generator, written as a PNG with A1111's metadata, and reported as a SampleImage
event; a prompt that fails is a warning naming it and the reason, and the round goes on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorad.errors import is_out_of_memory
from lorad.events import Event, EventSink, LogLine, SampleImage
from lorad.sampling.files import a1111_parameters, sample_path, write_sample_png
from lorad.sampling.prompts import ResolvedPrompt

# prompt, generator (CPU, seeded with the prompt's seed) → a PIL image of prompt.width x prompt.height.
RenderImage = Callable[[ResolvedPrompt, torch.Generator], Any]


class ImageRound:
    """Draws ``prompts`` into ``output_dir/samples/`` and tells ``on_event`` about each image."""

    def __init__(
        self,
        prompts: Sequence[ResolvedPrompt],
        *,
        output_dir: Path,
        output_name: str,
        on_event: EventSink,
        model: str = "",
    ) -> None:
        self.prompts = list(prompts)
        self.output_dir, self.output_name, self.on_event, self.model = output_dir, output_name, on_event, model

    def draw(self, step: int, render: RenderImage, *, baseline: bool = False) -> list[Event]:
        """Every prompt at ``step`` (``baseline``: drawn without the LoRA, so its metadata names none)."""
        events: list[Event] = []
        for prompt in self.prompts:
            event = self._one(step, prompt, render, baseline)
            self.on_event(event)
            events.append(event)
        return events

    def _one(self, step: int, prompt: ResolvedPrompt, render: RenderImage, baseline: bool) -> Event:
        try:
            # A CPU generator: the same seed draws the same starting noise on every device.
            image = render(prompt, torch.Generator("cpu").manual_seed(prompt.seed))
            path = sample_path(self.output_dir, self.output_name, step=step, index=prompt.index, seed=prompt.seed)
            lora = None if baseline else self.output_name
            write_sample_png(image, path, a1111_parameters(prompt, lora_name=lora, model=self.model, step=step))
        except Exception as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            if is_out_of_memory(err) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return LogLine(
                message=f"sample prompt {prompt.index} ({_short(prompt.prompt)!r}) failed at step {step}: {reason}",
                level="warning",
            )
        return SampleImage(
            step=step,
            prompt_index=prompt.index,
            prompt=prompt.prompt,
            seed=prompt.seed,
            path=str(path),
            width=image.width,
            height=image.height,
        )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
