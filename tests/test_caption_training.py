"""Training on a folder whose captions are partly missing: the configured captioner fills them in
first; without one, the run says which images lack captions and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.captioning.errors import CaptionModelError
from lorad.captioning.record import CaptionRecord
from lorad.captioning.training import caption_filler
from lorad.config import parse_config
from lorad.data.captions import read_metadata_csv
from lorad.data.dataset import scan_dataset
from lorad.events import DataReported, Event, LogLine
from lorad.models.tiny_captioners import build_tiny_blip, build_tiny_wd14
from lorad.training.loop import train as train_sd_lora
from tests.support.datasets import make_dataset, tiny_train_values


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "blip")


def half_captioned(root: Path) -> Path:
    """Eight images; the metadata CSV has rows for the first four only."""
    make_dataset(root, 8)
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(lines[:5]) + "\n")
    return root


@pytest.mark.slow
def test_a_job_captions_the_missing_half_then_trains(tiny_sd: Path, tiny_blip: Path, tmp_path: Path) -> None:
    data = half_captioned(tmp_path / "data")
    human = dict(read_metadata_csv(data / "metadata.csv").captions)
    values = tiny_train_values(
        tiny_sd,
        data,
        tmp_path / "out",
        captioner="blip",
        captioner_model=str(tiny_blip),
        caption_max_length=6,
        caption_batch_size=3,
        trigger_word="mystyle",
        max_train_steps=2,
    )
    config = parse_config({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, base_dir=tmp_path)
    events: list[Event] = []
    result = train_sd_lora(
        config, on_event=events.append, caption_missing=caption_filler(config, on_event=events.append)
    )

    report = next(e for e in events if isinstance(e, DataReported)).report
    assert (report["captions_from_csv"], report["captions_generated"], report["images_used"]) == (4, 4, 8)
    assert "4 generated" in next(e for e in events if isinstance(e, DataReported)).text
    logs = [e.message for e in events if isinstance(e, LogLine)]
    assert any("4 images without a caption: captioning with blip" in m for m in logs)
    assert any(m.startswith("generated 4 captions with blip") and "metadata.csv" in m for m in logs)
    assert result.steps == 2 and Path(result.outputs["kohya"]).is_file()

    # The captions were written where the config reads them, people's rows untouched, and recorded.
    captions = dict(read_metadata_csv(data / "metadata.csv").captions)
    assert len(captions) == 8 and all(captions[rel] == text for rel, text in human.items())
    generated = {rel: text for rel, text in captions.items() if rel not in human}
    assert all(text.startswith("mystyle, ") for text in generated.values())
    assert sorted(CaptionRecord.load(data).entries) == sorted(generated)
    # The next run reads them all from the CSV: nothing left to generate.
    _, again = scan_dataset(
        data, metadata_path=data / "metadata.csv", caption_missing=caption_filler(config, on_event=events.append)
    )
    assert (again.captions_from_csv, again.captions_generated) == (8, 0)


def test_a_missing_metadata_csv_is_created_by_the_captioner(tmp_path: Path) -> None:
    tagger = build_tiny_wd14(tmp_path / "wd14")
    data = make_dataset(tmp_path / "data", 3, csv=False)
    for sidecar in data.glob("*.txt"):
        sidecar.unlink()
    raw = {
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": "org/model",
        "output_dir": str(tmp_path / "out"),
        "captioner": "wd14",
        "captioner_model": str(tagger),
    }
    config = parse_config(raw, base_dir=tmp_path)  # the missing CSV is not an error: it will be written
    events: list[Event] = []
    filler = caption_filler(config, on_event=events.append)
    assert (data / "metadata.csv").read_text() == "file,caption\n"
    images, report = scan_dataset(data, metadata_path=data / "metadata.csv", caption_missing=filler)
    assert report.captions_generated == 3 and len(images) == 3
    # The tagger is hand-made: its one character tag always wins, ratings never show.
    assert all(i.caption.startswith("tiny hero, ") and "general" not in i.caption for i in images)
    assert len(read_metadata_csv(data / "metadata.csv").captions) == 3


def test_without_a_captioner_the_run_names_the_uncaptioned_images(tmp_path: Path) -> None:
    data = half_captioned(tmp_path / "data")
    raw = {
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": "org/model",
        "output_dir": str(tmp_path / "out"),
    }
    config = parse_config(raw, base_dir=tmp_path)
    events: list[Event] = []
    images, report = scan_dataset(
        data, metadata_path=data / "metadata.csv", caption_missing=caption_filler(config, on_event=events.append)
    )
    assert len(images) == 4 and report.captions_generated == 0
    (warning,) = [e for e in events if isinstance(e, LogLine)]
    assert warning.level == "warning"
    assert warning.message.startswith("4 images have no caption and will be skipped (img_04.png, img_05.png")
    assert f"`lorad caption {data}`" in warning.message and "`captioner: blip`" in warning.message
    assert {s.path for s in report.skipped} == {f"img_0{i}.png" for i in range(4, 8)}
    assert all(s.reason.startswith("no caption") for s in report.skipped)


def test_an_unusable_captioner_model_fails_before_training(tiny_sd: Path, tmp_path: Path) -> None:
    data = half_captioned(tmp_path / "data")
    folder = tmp_path / "blip"
    folder.mkdir()
    values = tiny_train_values(tiny_sd, data, tmp_path / "out", captioner="blip", captioner_model="org/not-cached")
    config = parse_config({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, base_dir=tmp_path)
    with pytest.raises(CaptionModelError) as err:
        train_sd_lora(config, caption_missing=caption_filler(config, on_event=lambda e: None))
    assert "`captioner_model`: 'org/not-cached' is neither a folder" in str(err.value)
    assert not (tmp_path / "out" / "out.safetensors").exists()
