"""Reviewing and editing a folder's captions through a real daemon: ListCaptions and SetCaptions."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from PIL import Image

from lorad.data.captions import read_metadata_csv
from lorad.models.tiny_captioners import build_tiny_wd14
from lorad_api.v1 import caption_pb2
from lorad_client import LoradClient, LoradRpcError


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("captioners") / "wd14")


def images_in(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 30, 30)).save(root / name)
    return root


def rows_of(response: caption_pb2.ListCaptionsResponse) -> dict[str, tuple[str, int, bool]]:
    return {row.path: (row.caption, row.source, row.generated) for row in response.rows}


def test_list_shows_each_caption_its_source_and_who_wrote_it(client: LoradClient, tagger: Path, tmp_path: Path) -> None:
    folder = images_in(tmp_path / "data", "a.png", "b.png", "sub/c.png")
    (folder / "a.txt").write_text("a person's caption\n")
    list(client.caption_images("data", base_dir=tmp_path, captioner=caption_pb2.CAPTIONER_KIND_WD14, model=str(tagger)))
    listed = client.list_captions("data", base_dir=tmp_path)
    assert listed.folder == str(folder) and listed.format == caption_pb2.CAPTION_FORMAT_TXT
    rows = rows_of(listed)
    assert list(rows) == ["a.png", "b.png", "sub/c.png"]
    assert rows["a.png"] == ("a person's caption", caption_pb2.CAPTION_SOURCE_SIDECAR, False)
    caption, source, generated = rows["sub/c.png"]
    assert caption.startswith("tiny hero") and source == caption_pb2.CAPTION_SOURCE_SIDECAR and generated

    (folder / "d.png").write_bytes((folder / "a.png").read_bytes())
    assert rows_of(client.list_captions(folder, base_dir=tmp_path))["d.png"] == (
        "",
        caption_pb2.CAPTION_SOURCE_NONE,
        False,
    )


def test_an_edited_generated_caption_is_written_beside_the_image_and_counts_as_the_users(
    client: LoradClient, tagger: Path, tmp_path: Path
) -> None:
    folder = images_in(tmp_path / "data", "a.png", "b.png")
    (folder / "a.txt").write_text("old\n")
    list(client.caption_images("data", base_dir=tmp_path, captioner=caption_pb2.CAPTIONER_KIND_WD14, model=str(tagger)))
    generated = (folder / "b.txt").read_text().strip()

    answer = client.set_captions("data", {"b.png": "  ohwx,   a red   square "}, base_dir=tmp_path)
    assert [(row.path, row.caption, row.generated) for row in answer.rows] == [("b.png", "ohwx, a red square", False)]
    assert (folder / "b.txt").read_text() == "ohwx, a red square\n"
    assert "b.png" not in json.loads((folder / ".lorad_captions.json").read_text())["captions"]

    # Even an edit back to the generated text is the user's now: regenerate leaves it alone.
    client.set_captions(folder, [("b.png", generated)], base_dir=tmp_path)
    again = list(
        client.caption_images(
            "data", base_dir=tmp_path, captioner=caption_pb2.CAPTIONER_KIND_WD14, model=str(tagger), regenerate=True
        )
    )
    assert again[-1].finished.captioned == 0 and (folder / "b.txt").read_text() == generated + "\n"


def test_edits_go_into_metadata_csv_when_the_folder_uses_one(client: LoradClient, tmp_path: Path) -> None:
    folder = images_in(tmp_path / "data", "a.png", "b.png", "c.png")
    (folder / "metadata.csv").write_text("file,caption,score\na.png,first,5\n")
    (folder / "c.txt").write_text("a sidecar caption\n")
    client.set_captions("data", {"a.png": "first, edited", "b.png": "second", "c.png": "third"}, base_dir=tmp_path)
    assert (folder / "metadata.csv").read_text() == 'file,caption,score\na.png,"first, edited",5\nb.png,second,\n'
    assert (folder / "c.txt").read_text() == "third\n"  # where training reads c's caption from
    assert dict(read_metadata_csv(folder / "metadata.csv").captions) == {"a.png": "first, edited", "b.png": "second"}
    rows = rows_of(client.list_captions("data", base_dir=tmp_path))
    assert rows["b.png"] == ("second", caption_pb2.CAPTION_SOURCE_CSV, False)
    assert rows["c.png"] == ("third", caption_pb2.CAPTION_SOURCE_SIDECAR, False)


def test_bad_folders_and_edits_are_refused_naming_the_path_and_nothing_is_written(
    client: LoradClient, tmp_path: Path
) -> None:
    folder = images_in(tmp_path / "data", "a.png")
    with pytest.raises(LoradRpcError) as err:
        client.list_captions("nowhere", base_dir=tmp_path)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`folder`: {tmp_path}/nowhere does not exist" in str(err.value)

    with pytest.raises(LoradRpcError) as err:
        client.set_captions(
            "data",
            [("a.png", "fine"), ("../secret.png", "x"), ("/etc/passwd", "x"), ("missing.png", "x"), ("a.png", " ")],
            base_dir=tmp_path,
        )
    message = str(err.value)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`edits[1].path`: '../secret.png' is outside {folder}" in message
    assert f"`edits[2].path`: '/etc/passwd' is outside {folder}" in message
    assert f"`edits[3].path`: {folder}/missing.png is not an image of the folder" in message
    assert "`edits[4].caption`: is empty for a.png" in message
    assert not (folder / "a.txt").exists() and not (folder / "metadata.csv").exists()
