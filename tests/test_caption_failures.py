"""A caption problem stays the problem of the images it concerns: a too-long caption length is
clamped to the model's limit, a batch the captioner fails on marks its images failed and the run
goes on, and a metadata.csv row without a caption is skipped and named by its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.captioning.captioner import CaptionerKey, load_captioner
from lorad.captioning.options import CaptionOptions
from lorad.captioning.runner import caption_images
from lorad.data.dataset import scan_dataset
from lorad.models.tiny_captioners import build_tiny_blip
from tests.support.datasets import make_dataset


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "blip")  # a 64-position text decoder


def outcomes(captioner: object, images: list[Path], **options: object) -> list:
    return [o for batch in caption_images(captioner, images, CaptionOptions(**options), batch_size=2) for o in batch]


def test_more_new_tokens_than_the_position_table_holds_are_clamped(tmp_path: Path, tiny_blip: Path) -> None:
    images = sorted(make_dataset(tmp_path / "data", count=3, csv=False).glob("*.png"))
    captioner = load_captioner(CaptionerKey(kind="blip", model=str(tiny_blip), device="cpu", dtype="float32"))
    done = outcomes(captioner, images, max_length=300)
    assert [o.error for o in done] == ["", "", ""] and all(o.caption for o in done)
    tokens = captioner.processor.tokenizer(done[0].caption, add_special_tokens=False)["input_ids"]
    assert len(tokens) < 64


def test_a_batch_the_captioner_fails_on_marks_its_images_and_the_run_goes_on(
    tmp_path: Path, tiny_blip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = sorted(make_dataset(tmp_path / "data", count=5, csv=False).glob("*.png"))
    captioner = load_captioner(CaptionerKey(kind="blip", model=str(tiny_blip), device="cpu", dtype="float32"))
    real = captioner.caption
    calls = {"n": 0}

    def second_batch_fails(batch: list, options: CaptionOptions) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(batch, options)

    monkeypatch.setattr(captioner, "caption", second_batch_fails)
    done = outcomes(captioner, images, max_length=10)
    assert len(done) == 5
    failed = [o for o in done if o.error]
    assert len(failed) == 2 and all("device-side assert" in o.error and "blip captioner" in o.error for o in failed)
    assert sum(1 for o in done if o.caption) == 3  # the batches before and after it were captioned


def test_a_metadata_row_without_a_caption_is_skipped_and_named(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", count=4)
    csv = data / "metadata.csv"
    lines = csv.read_text().splitlines()
    lines[2] = "img_01.png"  # a caption never written: no comma, no caption field
    csv.write_text("\n".join(lines) + "\n")
    images, report = scan_dataset(data, metadata_path=csv)
    assert sorted(i.rel for i in images) == ["img_00.png", "img_02.png", "img_03.png"]
    problem = next(p for p in report.csv_problems if "line 3" in p)
    assert "metadata.csv line 3: no `caption` field for `img_01.png`" in problem
    assert "quote" not in report.render().lower()
