"""Captions: the metadata CSV, sidecar files, and kohya-style caption preparation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorad.data.captions import SidecarError, prepare_caption, read_metadata_csv, read_sidecar
from lorad.errors import DataError

TAGS = "a, b, c, d, e, f, g, h"


def prep(
    caption: str,
    seed: int = 0,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout: float = 0.0,
    trigger_word: str | None = None,
) -> str:
    return prepare_caption(
        caption,
        rng=random.Random(seed),
        shuffle=shuffle,
        keep_tokens=keep_tokens,
        dropout=dropout,
        trigger_word=trigger_word,
    )


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",")]


# --- prepare_caption -------------------------------------------------------------------------


def test_without_options_caption_is_unchanged() -> None:
    assert prep("a photo of a cat,  sitting") == "a photo of a cat,  sitting"


def test_shuffle_permutes_tags_and_keeps_the_first_keep_tokens_in_place() -> None:
    results = [prep(TAGS, seed, shuffle=True, keep_tokens=2) for seed in range(30)]
    for result in results:
        assert tags(result)[:2] == ["a", "b"]
        assert sorted(tags(result)) == sorted(tags(TAGS))
    assert len({r for r in results}) > 10  # really shuffled, not one fixed order


def test_shuffle_is_deterministic_for_a_given_rng_state() -> None:
    assert prep(TAGS, 7, shuffle=True) == prep(TAGS, 7, shuffle=True)

    def sequence(rng: random.Random) -> list[str]:
        return [
            prepare_caption(TAGS, rng=rng, shuffle=True, keep_tokens=1, dropout=0.3, trigger_word="ohwx")
            for _ in range(20)
        ]

    assert sequence(random.Random(3)) == sequence(random.Random(3))


def test_dropout_blanks_the_whole_caption_at_the_given_rate() -> None:
    assert prep(TAGS, dropout=1.0, trigger_word="ohwx") == ""
    rng = random.Random(0)
    blanks = sum(
        prepare_caption(TAGS, rng=rng, shuffle=False, keep_tokens=0, dropout=0.25, trigger_word=None) == ""
        for _ in range(2000)
    )
    assert 400 < blanks < 600


def test_trigger_word_is_put_first_when_absent() -> None:
    assert prep("a cat, on a sofa", trigger_word="ohwx") == "ohwx, a cat, on a sofa"
    assert prep("", trigger_word="ohwx") == "ohwx"


def test_trigger_word_is_not_added_twice() -> None:
    assert prep("photo of OHWX cat, sofa", trigger_word="ohwx") == "photo of OHWX cat, sofa"
    # "ohwxy" is another word: the trigger is still missing.
    assert prep("ohwxy, sofa", trigger_word="ohwx") == "ohwx, ohwxy, sofa"


def test_trigger_word_stays_first_under_shuffle_even_with_keep_tokens_zero() -> None:
    for seed in range(20):
        assert tags(prep(TAGS, seed, shuffle=True, trigger_word="ohwx"))[0] == "ohwx"
        moved = prep("a, b, ohwx, c, d", seed, shuffle=True, trigger_word="ohwx")
        assert tags(moved)[0] == "ohwx" and sorted(tags(moved)) == ["a", "b", "c", "d", "ohwx"]


def test_trigger_word_counts_among_kept_tokens() -> None:
    # keep_tokens=2 with a trigger: the trigger and the caption's first tag are kept.
    for seed in range(20):
        assert tags(prep(TAGS, seed, shuffle=True, keep_tokens=2, trigger_word="ohwx"))[:2] == ["ohwx", "a"]
    seconds = {tags(prep(TAGS, s, shuffle=True, keep_tokens=1, trigger_word="ohwx"))[1] for s in range(30)}
    assert len(seconds) > 1  # keep_tokens=1 keeps only the trigger


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError):
        prep(TAGS, dropout=1.5)
    with pytest.raises(ValueError):
        prep(TAGS, keep_tokens=-1)


# --- metadata CSV ----------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "metadata.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_bom_quoted_commas_and_diffusers_header(tmp_path: Path) -> None:
    text = 'file_name,text,extra\r\ncat.png,"a cat, sitting",x\r\n./sub\\dog.jpg,dog,y\r\n\r\n'
    path = write_csv(tmp_path, text, encoding="utf-8-sig")
    result = read_metadata_csv(path)
    assert dict(result.captions) == {"cat.png": "a cat, sitting", "sub/dog.jpg": "dog"}
    assert result.lines["sub/dog.jpg"] == 3
    assert result.problems == ()


def test_csv_duplicate_empty_and_outside_rows_are_reported_not_fatal(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "file,caption\ncat.png,first\ndog.png,\ncat.png,second\n../x.png,up\n")
    result = read_metadata_csv(path)
    assert dict(result.captions) == {"cat.png": "first"}
    assert result.problems == (
        "metadata.csv line 3: empty caption for `dog.png` (row ignored)",
        "metadata.csv line 4: duplicate row for `cat.png` (line 2 is used)",
        "metadata.csv line 5: file `../x.png` must be a path inside train_data_dir "
        "(no absolute path, no `..`) (row ignored)",
    )


def test_unquoted_commas_belong_to_the_last_caption_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "file,caption\ncat.png,a cat\ndog.png,a dog, running, grass\n")
    assert read_metadata_csv(path).captions["dog.png"] == "a dog, running, grass"


def test_extra_fields_before_the_caption_name_file_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "caption,file\na cat,cat.png\na dog, running,dog.png\n")
    with pytest.raises(DataError) as err:
        read_metadata_csv(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    assert "quotes" in err.value.hint


def test_unclosed_quote_names_file_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'file,caption\ncat.png,"a cat\n')
    with pytest.raises(DataError, match=r"metadata\.csv line 2"):
        read_metadata_csv(path)


def test_non_utf8_csv_names_the_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "file,caption\ncat.png,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"line 2: not UTF-8") as err:
        read_metadata_csv(path)
    assert "UTF-8" in err.value.hint


def test_header_without_caption_column_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "file,description\ncat.png,a cat\n")
    with pytest.raises(DataError, match="lacks a caption column"):
        read_metadata_csv(path)


# --- sidecar files ---------------------------------------------------------------------------


def test_sidecar_first_non_empty_line_and_missing(tmp_path: Path) -> None:
    image = tmp_path / "cat.v2.png"
    assert read_sidecar(image) is None
    (tmp_path / "cat.v2.txt").write_bytes("\ufeff\n  a cat, sofa  \nignored\n".encode())
    assert read_sidecar(image) == "a cat, sofa"
    (tmp_path / "cat.v2.caption").write_text("other")
    assert read_sidecar(image, "caption") == "other"


def test_empty_sidecar_is_an_error_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "cat.txt").write_text(" \n\n")
    with pytest.raises(SidecarError, match=r"cat\.txt is empty"):
        read_sidecar(tmp_path / "cat.png")
