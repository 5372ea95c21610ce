"""Captioning folders with the tiny models (random BLIP and CLIP, hand-made WD14 tagger), in process.

Random models give random captions: these tests check which captions are written, merged, kept and
overwritten, and how they are formatted; the tagger is hand-made, so its tags are exact.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from lorad.captioning.captioner import CaptionerKey, load_captioner
from lorad.captioning.folder import caption_folder
from lorad.captioning.options import CaptionOptions
from lorad.captioning.record import RECORD_NAME, CaptionRecord
from lorad.captioning.request import caption_request
from lorad.captioning.runner import caption_images
from lorad.captioning.updates import CAPTIONED, FAILED, KEPT, CaptionerReady, CaptionFinished, CaptionPlanned
from lorad.cli import main
from lorad.data.captions import read_metadata_csv
from lorad.models.tiny_captioners import build_tiny_blip, build_tiny_clip, build_tiny_git, build_tiny_wd14

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {
        "blip": build_tiny_blip(root / "blip"),
        "clip": build_tiny_clip(root / "clip"),
        "wd14": build_tiny_wd14(root / "wd14"),
        "wd14-batch1": build_tiny_wd14(root / "wd14-batch1", batch=1),
    }


def picture(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def run(folder: Path, model: Path, captioner: str, **options: object) -> list[object]:
    request = caption_request(str(folder), base_dir=folder, captioner=captioner, model=str(model), **options)
    return list(caption_folder(request))


def results(updates: list[object]) -> dict[str, tuple[str, str]]:
    """path → (status, caption or error) of every ImageCaptioned update."""
    return {u.path: (u.status, u.caption or u.error) for u in updates if hasattr(u, "status")}


def test_csv_captions_are_merged_and_a_persons_rows_survive(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    for name, colour in (("a.png", RED), ("b.png", GREEN), ("sub/c.png", BLUE), ("d.jpg", RED)):
        picture(folder / name, colour)
    (folder / "metadata.csv").write_text("file,caption,rating\na.png,my own words,5\n")
    updates = run(
        folder, models["blip"], "blip", options=CaptionOptions(max_length=6), batch_size=2, trigger_word="ohwx"
    )

    planned, kept, ready, *images, finished = updates  # kept images are reported before the model loads
    assert isinstance(planned, CaptionPlanned) and isinstance(ready, CaptionerReady)
    assert isinstance(finished, CaptionFinished)
    assert (planned.images_found, planned.to_caption, planned.to_keep, planned.format) == (4, 3, 1, "csv")
    assert [u.done for u in (kept, *images)] == [1, 2, 3, 4] and {u.total for u in images} == {4}
    assert (finished.captioned, finished.kept, finished.failed, finished.stopped) == (3, 1, 0, False)
    assert ready.model_version == "blip" and not ready.resident
    got = results(updates)
    assert got["a.png"] == (KEPT, "my own words")
    for name in ("b.png", "sub/c.png", "d.jpg"):
        status, caption = got[name]
        assert status == CAPTIONED and caption.startswith("ohwx, ") and len(caption) > len("ohwx, ")

    csv = read_metadata_csv(folder / "metadata.csv")
    assert dict(csv.captions) == {"a.png": "my own words", **{n: got[n][1] for n in ("b.png", "sub/c.png", "d.jpg")}}
    assert (folder / "metadata.csv").read_text().splitlines()[:2] == ["file,caption,rating", "a.png,my own words,5"]
    record = CaptionRecord.load(folder)
    assert sorted(record.entries) == ["b.png", "d.jpg", "sub/c.png"]
    assert record.entries["b.png"].captioner == "blip" and record.entries["b.png"].model == str(models["blip"])

    # Nothing left to caption: no model is loaded, nothing is rewritten.
    again = run(folder, models["blip"], "blip")
    assert not any(isinstance(u, CaptionerReady) for u in again)
    assert again[-1].kept == 4 and again[-1].captioned == 0


def test_txt_sidecars_keep_a_persons_caption_unless_overwrite(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    picture(folder / "red.png", RED)
    picture(folder / "green.png", GREEN)
    picture(folder / "blue.png", BLUE, size=(30, 60))
    (folder / "red.txt").write_text("a person wrote this\n")
    updates = run(folder, models["wd14"], "wd14")
    assert updates[0].format == "txt"
    # The hand-made tagger: character tags first, underscores as spaces except in ^_^, no rating tags.
    assert (folder / "green.txt").read_text() == "tiny hero, green theme, simple background, ^_^\n"
    assert (folder / "blue.txt").read_text() == "tiny hero, blue theme, simple background, ^_^\n"
    assert (folder / "red.txt").read_text() == "a person wrote this\n"
    mode = stat.S_IMODE((folder / "green.txt").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # an ordinary file, not the 0600 of a temporary file

    run(
        folder,
        models["wd14"],
        "wd14",
        overwrite=True,
        trigger_word="ohwx",
        options=CaptionOptions(general_threshold=0.6, exclude_tags=("tiny hero",)),
    )
    assert (folder / "red.txt").read_text() == "ohwx, red theme, simple background\n"
    assert (folder / "green.txt").read_text() == "ohwx, green theme, simple background\n"
    assert sorted(CaptionRecord.load(folder).entries) == ["blue.png", "green.png", "red.png"]


def test_regenerate_replaces_only_generated_captions_nobody_edited(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png"):
        picture(folder / name, RED)
    (folder / "c.txt").write_text("by hand\n")
    run(folder, models["wd14"], "wd14")
    (folder / "b.txt").write_text("tiny hero, red theme, edited by a person\n")
    updates = run(folder, models["wd14"], "wd14", regenerate=True, options=CaptionOptions(character_threshold=0.4))
    assert results(updates) == {
        "a.png": (CAPTIONED, "tiny hero, tiny villain, red theme, simple background, ^_^"),
        "b.png": (KEPT, "tiny hero, red theme, edited by a person"),
        "c.png": (KEPT, "by hand"),
    }


def test_an_unreadable_image_is_reported_and_the_others_are_captioned(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    for index in range(4):
        picture(folder / f"good_{index}.png", GREEN, size=(32 + 8 * index, 32))
    whole = (folder / "good_0.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all")
    updates = run(folder, models["blip"], "blip", options=CaptionOptions(max_length=4), batch_size=3)
    got = results(updates)
    assert [u.path for u in updates[2:-1]][-1] in got  # one result per image, the summary last
    assert len(got) == 7 and updates[-1].failed == 3 and updates[-1].captioned == 4
    assert got["truncated.png"][0] == FAILED and "truncated" in got["truncated.png"][1].lower()
    assert got["empty.jpg"] == (FAILED, "unreadable image: cannot identify image file")
    assert got["notes.png"] == (FAILED, "unreadable image: cannot identify image file")
    assert all(got[f"good_{i}.png"][0] == CAPTIONED for i in range(4))
    assert sorted(p.name for p in folder.glob("*.txt")) == []  # nothing existed: metadata.csv
    assert len(read_metadata_csv(folder / "metadata.csv").captions) == 4


def test_batched_captions_equal_one_by_one(tmp_path: Path, models: dict[str, Path]) -> None:
    colours = [RED, GREEN, BLUE, (200, 200, 200), (240, 30, 60)]
    paths = [picture(tmp_path / f"{i}.png", c, size=(24 + 8 * i, 40)) for i, c in enumerate(colours)]

    def captions(kind: str, batch_size: int, model: str | None = None) -> dict[Path, str]:
        captioner = load_captioner(CaptionerKey(kind, str(models[model or kind]), "cpu", "float32"))
        out = {}
        for batch in caption_images(captioner, paths, CaptionOptions(max_length=5), batch_size=batch_size):
            out.update({o.path: o.caption for o in batch})
        return out

    assert captions("wd14", 4) == captions("wd14", 1)
    # A network whose graph fixes the batch at 1 still takes batches of 4 (it is run image by image).
    assert captions("wd14", 4, "wd14-batch1") == captions("wd14", 1)
    batched, single = captions("blip", 4), captions("blip", 1)
    assert batched.keys() == single.keys() == set(paths) and all(batched.values())


def test_a_prompt_starts_every_sentence(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    picture(folder / "a.png", RED)
    picture(folder / "b.png", BLUE, size=(50, 20))
    updates = run(
        folder, models["blip"], "blip", options=CaptionOptions(prompt="a photo of", max_length=5, num_beams=2)
    )
    captions = [caption for status, caption in results(updates).values()]
    assert len(captions) == 2 and all(c.startswith("a photo of ") for c in captions)


def test_git_is_run_by_the_same_sentence_captioner(tmp_path: Path, models: dict[str, Path]) -> None:
    git = build_tiny_git(tmp_path / "git")
    folder = tmp_path / "data"
    picture(folder / "a.png", RED)
    picture(folder / "b.png", GREEN)
    updates = run(folder, git, "blip", options=CaptionOptions(max_length=4))
    assert next(u for u in updates if isinstance(u, CaptionerReady)).model_version == "git"
    assert [status for status, _ in results(updates).values()] == [CAPTIONED, CAPTIONED]
    prompted = run(folder, git, "blip", overwrite=True, options=CaptionOptions(prompt="a photo of", max_length=4))
    assert all(caption.startswith("a photo of ") for _, caption in results(prompted).values())


def test_clip_keeps_the_best_phrases_of_each_section(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = tmp_path / "data"
    picture(folder / "a.png", RED)
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("[colour 2]\nred\ngreen\nblue\nyellow\n[thing]\na cat\na dog\na car\n")
    updates = run(folder, models["clip"], "clip", options=CaptionOptions(vocabulary=vocabulary, top_k=1))
    caption = results(updates)["a.png"][1]
    colours, thing = caption.split(", ")[:2], caption.split(", ")[2:]
    assert len(colours) == 2 and set(colours) <= {"red", "green", "blue", "yellow"}
    assert len(thing) == 1 and thing[0] in {"a cat", "a dog", "a car"}
    builtin = run(folder, models["clip"], "clip", overwrite=True)
    assert len(results(builtin)["a.png"][1].split(", ")) == 6  # one phrase from each built-in section


def test_lorad_caption_without_a_daemon(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data"
    picture(folder / "a.png", RED)
    picture(folder / "b.png", GREEN)
    (folder / "b.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "caption",
            "data",
            "--captioner",
            "wd14",
            "--model",
            str(models["wd14"]),
            "--trigger",
            "ohwx",
            "--exclude",
            "simple_background,^_^",
            "-v",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no lorad daemon running: captioning in this process" in err
    assert "a.png: ohwx, tiny hero, red theme" in err
    assert "done: 1 captioned, 1 kept, 0 failed" in out and RECORD_NAME in out
    assert (folder / "a.txt").read_text() == "ohwx, tiny hero, red theme\n"

    code = main(["caption", "data", "--captioner", "wd14", "--model", "missing-folder", "--embedded"])
    _, err = capsys.readouterr()
    assert code == 1 and f"error: `--model`: {tmp_path}/missing-folder does not exist" in err
    code = main(["caption", "nowhere", "--batch-size", "0", "--embedded"])
    _, err = capsys.readouterr()
    assert code == 2 and "`DIR`" in err and "`--batch-size`: got 0" in err
