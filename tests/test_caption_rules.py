"""Captioning rules without captioner models: tags, triggers, batching, CSV merging, the record of
generated captions, per-image decisions, model-folder checks, vocabularies and config keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lorad.captioning.clip_ranking import BUILTIN_VOCABULARY, Section, read_vocabulary
from lorad.captioning.csv_file import CaptionCsv
from lorad.captioning.errors import CaptionModelError, VocabularyError
from lorad.captioning.folder import CAPTION, KEEP, REPORT, detect_format, plan_folder
from lorad.captioning.images import plan_batches
from lorad.captioning.model_folder import folder_problems, resolve_captioner_model
from lorad.captioning.options import CaptionOptions
from lorad.captioning.record import RECORD_NAME, CaptionRecord, GeneratedCaption
from lorad.captioning.request import caption_request
from lorad.captioning.tagger import Tag, format_tags, read_selected_tags
from lorad.captioning.writer import CaptionWriter, with_trigger
from lorad.config import parse_config
from lorad.data.captions import read_metadata_csv
from lorad.errors import ConfigError, DataError

TAGS = (
    Tag("general", 9),
    Tag("red_hair", 0),
    Tag("simple_background", 0),
    Tag("^_^", 0),
    Tag("long_hair", 0),
    Tag("hero_(tiny)", 4),
    Tag("villain", 4),
)


def test_tags_are_written_the_kohya_way() -> None:
    scores = [0.99, 0.9, 0.5, 0.6, 0.2, 0.95, 0.5]
    assert format_tags(scores, TAGS, CaptionOptions()) == "hero (tiny), red hair, ^_^, simple background"
    # Thresholds: general 0.55 drops simple_background; character 0.4 adds villain after the better hero.
    options = CaptionOptions(general_threshold=0.55, character_threshold=0.4)
    assert format_tags(scores, TAGS, options) == "hero (tiny), villain, red hair, ^_^"
    # Exclusions match either spelling, any case; a rating tag never appears even at 0.99.
    options = CaptionOptions(exclude_tags=("Simple Background", "red_hair"))
    assert format_tags(scores, TAGS, options) == "hero (tiny), ^_^"


def test_trigger_word_is_put_first_once() -> None:
    assert with_trigger("a red car", "ohwx") == "ohwx, a red car"
    assert with_trigger("photo of OHWX, a red car", "ohwx") == "photo of OHWX, a red car"
    assert with_trigger("ohwxy, a car", "ohwx") == "ohwx, ohwxy, a car"  # whole words only
    assert with_trigger("<sks> dog", "<sks>") == "<sks> dog"
    assert with_trigger("a car", "") == "a car"


def test_batches_group_images_of_similar_shape() -> None:
    sizes = [(512, 512), (768, 512), (512, 768), (500, 500), (760, 510), (520, 780), (64, 64)]
    batches = plan_batches(sizes, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(len(batch) <= 2 for batch in batches)
    # Portraits together, squares together (smallest first), landscapes together; the odd one last.
    assert batches == [[2, 5], [6, 3], [4, 1], [0]]
    assert plan_batches(sizes, 2) == batches  # deterministic
    assert plan_batches(sizes, 100) == [[2, 5, 6, 3, 0, 4, 1]]
    assert plan_batches(sizes, 1) == [[2], [5], [6], [3], [0], [4], [1]]
    with pytest.raises(ValueError):
        plan_batches(sizes, 0)


def test_csv_merge_keeps_other_rows_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    # An extra column, an unquoted comma in the last column, a blank line: all things people write.
    path.write_text("file_name,score,text\na.png,5,a person's caption, with commas\n\nb.png,3,\n")
    document = CaptionCsv.open(path)
    assert document.caption_of("a.png") == "a person's caption, with commas" and document.caption_of("b.png") is None
    document.set("b.png", "a generated caption")
    document.set("sub/c.png", 'a "quoted", caption')
    document.save()
    assert path.read_text().splitlines()[:2] == ["file_name,score,text", 'a.png,5,"a person\'s caption, with commas"']
    read = read_metadata_csv(path)
    assert dict(read.captions) == {
        "a.png": "a person's caption, with commas",
        "b.png": "a generated caption",
        "sub/c.png": 'a "quoted", caption',
    }
    assert CaptionCsv.open(path).rows[1] == ["b.png", "3", "a generated caption"]


def test_a_malformed_csv_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text('file,caption,extra\na.png,"never closed\n')
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"metadata\.csv line 2"):
        CaptionWriter(tmp_path, format="csv", captioner="blip", model="/m")
    assert path.read_bytes() == before


def test_the_record_tells_generated_captions_from_edited_ones(tmp_path: Path) -> None:
    record = CaptionRecord.load(tmp_path)
    assert not record.entries
    entry = GeneratedCaption("ohwx, a red car", "wd14", "/models/wd14", "a.txt", 1.0)
    record.with_entries({"a.png": entry}).save()
    again = CaptionRecord.load(tmp_path)
    assert again.is_generated("a.png", "ohwx, a red car")
    assert not again.is_generated("a.png", "ohwx, a red car, edited")  # a person's now
    assert not again.is_generated("b.png", "anything")
    data = json.loads((tmp_path / RECORD_NAME).read_text())
    assert data["captions"]["a.png"]["model"] == "/models/wd14"
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert not CaptionRecord.load(tmp_path).entries  # unreadable: everything counts as a person's


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / name)


def test_the_default_format_follows_the_folder(tmp_path: Path) -> None:
    _images(tmp_path, "a.png", "b.png")
    images = sorted(tmp_path.glob("*.png"))
    assert detect_format(tmp_path, images, ".txt") == "csv"  # nothing yet: metadata.csv, as the original tool
    (tmp_path / "b.txt").write_text("a caption")
    assert detect_format(tmp_path, images, ".txt") == "txt"
    assert detect_format(tmp_path, images, ".caption") == "csv"
    (tmp_path / "metadata.csv").write_text("file,caption\n")
    assert detect_format(tmp_path, images, ".txt") == "csv"


def test_each_image_gets_the_right_decision(tmp_path: Path) -> None:
    _images(tmp_path, "human.png", "bare.png", "empty.png", "latin1.png", "generated.png", "edited.png")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "human.txt").write_text("written by a person\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "generated.txt").write_text("tag one, tag two\n")
    (tmp_path / "edited.txt").write_text("tag one, tag three\n")
    made = GeneratedCaption("tag one, tag two", "wd14", "/m", "x.txt", 1.0)
    CaptionRecord(tmp_path / RECORD_NAME, {"generated.png": made, "edited.png": made}).save()

    def actions(**flags: bool) -> dict[str, str]:
        plan = plan_folder(tmp_path, **flags)
        assert plan.format == "txt"
        return {image.rel: image.action for image in plan.images}

    assert actions() == {
        "anim.gif": REPORT,
        "bare.png": CAPTION,
        "edited.png": KEEP,
        "empty.png": CAPTION,
        "generated.png": KEEP,
        "human.png": KEEP,
        "latin1.png": REPORT,
    }
    assert actions(regenerate=True)["generated.png"] == CAPTION
    assert {k: v for k, v in actions(regenerate=True).items() if v == CAPTION} == {
        "bare.png": CAPTION,
        "empty.png": CAPTION,
        "generated.png": CAPTION,
    }
    assert actions(overwrite=True) == {
        "anim.gif": REPORT,
        **{
            name: CAPTION
            for name in ("bare.png", "edited.png", "empty.png", "generated.png", "human.png", "latin1.png")
        },
    }
    reasons = {image.rel: image.reason for image in plan_folder(tmp_path).images if image.action == REPORT}
    assert "unsupported image type .gif" in reasons["anim.gif"]
    assert "latin1.txt is not UTF-8" in reasons["latin1.png"] and "--overwrite" in reasons["latin1.png"]


@pytest.mark.parametrize(
    ("kind", "files", "missing"),
    [
        (
            "blip",
            {"config.json": '{"model_type": "blip"}', "model.safetensors": "", "vocab.txt": ""},
            "preprocessor_config.json",
        ),
        (
            "blip",
            {
                "config.json": '{"model_type": ',
                "model.safetensors": "",
                "vocab.txt": "",
                "preprocessor_config.json": "{}",
            },
            "config.json is not valid JSON (line 1",
        ),
        (
            "blip",
            {
                "config.json": '{"model_type": "clip"}',
                "model.safetensors": "",
                "vocab.json": "",
                "preprocessor_config.json": "{}",
            },
            "model_type 'clip', which is not an image-to-text model",
        ),
        ("clip", {"config.json": '{"model_type": "clip"}', "preprocessor_config.json": "{}"}, "model.safetensors"),
        ("clip", {"model.safetensors": "", "vocab.json": "", "preprocessor_config.json": "{}"}, "lacks config.json"),
        ("wd14", {"model.onnx": ""}, "selected_tags.csv"),
        ("wd14", {"selected_tags.csv": "tag_id,name,category,count\n"}, "model.onnx"),
    ],
)
def test_an_incomplete_model_folder_names_the_path_and_what_is_missing(
    tmp_path: Path, kind: str, files: dict[str, str], missing: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert any(missing in problem for problem in folder_problems(kind, folder))
    with pytest.raises(CaptionModelError) as err:
        resolve_captioner_model(kind, "model", base_dir=tmp_path, key="--model")
    assert str(err.value).startswith(f"`--model`: {folder} is not a complete") and missing in str(err.value)
    assert err.value.hint


def test_a_missing_model_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelError, match=rf"`captioner_model`: {tmp_path}/nope does not exist"):
        resolve_captioner_model("wd14", "./nope", base_dir=tmp_path, key="captioner_model")
    (tmp_path / "file.onnx").write_text("")
    with pytest.raises(CaptionModelError, match="is a file, not a WD14 tagger model folder"):
        resolve_captioner_model("wd14", "file.onnx", base_dir=tmp_path, key="--model")
    with pytest.raises(CaptionModelError) as err:
        resolve_captioner_model("blip", "", base_dir=tmp_path, key="--model")  # the default, not cached here
    assert "Salesforce/blip-image-captioning-large" in str(err.value) and "no model was named" in str(err.value)
    assert "hf download Salesforce/blip-image-captioning-large" in err.value.hint


def test_a_malformed_tag_list_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "selected_tags.csv"
    path.write_text("tag_id,name,category,count\n1,red_hair,0,5\n2,blue_hair,general,5\n")
    with pytest.raises(CaptionModelError, match=r"selected_tags.csv line 3: the category is not a number"):
        read_selected_tags(path)
    path.write_text("id,tag\n1,red_hair\n")
    with pytest.raises(CaptionModelError, match=r"line 1: the header lacks a name column"):
        read_selected_tags(path)
    path.write_text("tag_id,name,category,count\n9,general,9,1\n1,red_hair,0,5\n")
    assert read_selected_tags(path) == (Tag("general", 9), Tag("red_hair", 0))


def test_vocabulary_files(tmp_path: Path) -> None:
    builtin = read_vocabulary(None)
    assert [s.name for s in builtin] == ["subject", "medium", "style", "lighting", "colour", "composition"]
    assert all(s.keep == 1 for s in builtin) and BUILTIN_VOCABULARY.is_file()
    path = tmp_path / "words.txt"
    path.write_text("# mine\nred\nblue\nred\n\n[3d art 2]\nclay\nvoxels\n[2]\n[look]\nshiny\n")
    assert read_vocabulary(path) == (
        Section("", ("red", "blue")),
        Section("3d art", ("clay", "voxels"), 2),
        Section("look", ("shiny",)),
    )
    path.write_text("red\n[broken\n")
    with pytest.raises(VocabularyError, match=r"words.txt line 2: starts with `\[` but is not a `\[section\]`"):
        read_vocabulary(path)
    path.write_text("# only comments\n[empty]\n")
    with pytest.raises(VocabularyError, match="holds no phrase"):
        read_vocabulary(path)


def _config(tmp_path: Path, **values: object):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    raw = {"train_data_dir": str(data), "base_model": "org/model", "output_dir": str(tmp_path / "out")} | values
    return parse_config(raw, base_dir=tmp_path)


def test_config_keys_for_captioning(tmp_path: Path) -> None:
    wd14 = tmp_path / "wd14"
    wd14.mkdir()
    (wd14 / "model.onnx").write_text("")
    (wd14 / "selected_tags.csv").write_text("")
    config = _config(
        tmp_path,
        captioner="WD14",
        captioner_model="./wd14",
        metadata_path="data/metadata.csv",
        caption_exclude_tags=[],
        caption_general_threshold="0.5",
    )
    # A missing metadata_path is fine with a captioner: it writes the file.
    assert config.captioner == "wd14" and config.captioner_model == str(wd14)
    assert config.caption_exclude_tags == () and config.caption_general_threshold == 0.5
    assert _config(tmp_path, captioner="blip", captioner_model="Salesforce/blip").captioner_model == "Salesforce/blip"

    with pytest.raises(ConfigError) as err:
        _config(
            tmp_path,
            captioner="blib",
            captioner_model="./wd14",
            caption_vocabulary="nope.txt",
            caption_character_threshold=1.5,
            metadata_path="data/metadata.csv",
        )
    text = str(err.value)
    assert "`captioner`: got 'blib' — did you mean `blip`?" in text
    assert "`captioner_model`: is set but `captioner` is not" in text
    assert "`caption_vocabulary`" in text and "`caption_character_threshold`: got 1.5" in text
    assert "`metadata_path`" in text  # without a valid captioner, a missing CSV is still an error

    with pytest.raises(ConfigError) as err:
        _config(tmp_path, captioner="blip", captioner_model="./wd14")
    assert f"`captioner_model`: {wd14} is not a complete blip model folder: it lacks config.json" in str(err.value)


def test_a_caption_request_reports_every_problem_at_once(tmp_path: Path) -> None:
    options = CaptionOptions(max_length=0, general_threshold=2.0, vocabulary=Path("none.txt"))
    with pytest.raises(ConfigError) as err:
        caption_request(
            "missing",
            base_dir=tmp_path,
            captioner="wd41",
            format="json",
            batch_size=0,
            device="gpu",
            options=options,
            overwrite=True,
            regenerate=True,
            names={"folder": "DIR", "batch_size": "--batch-size", "max_length": "--max-length"},
        )
    text = str(err.value)
    for expected in (
        f"`DIR`: {tmp_path}/missing does not exist",
        "`captioner`: got 'wd41' — did you mean `wd14`?",
        "`format`: got 'json'",
        "`device`: got 'gpu'",
        "`--batch-size`: got 0",
        "`--max-length`: got 0",
        "`general_threshold`: got 2.0",
        f"`vocabulary`: {tmp_path}/none.txt is not a file",
        "`regenerate`: is given with overwrite",
    ):
        assert expected in text, expected
