"""Scanning a training folder: images, captions, skips with reasons, repeats, and pixel loading."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lorad.data.dataset import load_image_for_bucket, scan_dataset
from lorad.data.report import DataReport
from lorad.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save_image(path: Path, size: tuple[int, int] = (32, 24), color: tuple[int, ...] = RED, **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGBA" if len(color) == 4 else "RGB"
    Image.new(mode, size, color).save(path, **save)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    noise.save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def reasons(report: DataReport) -> dict[str, str]:
    return {s.path: s.reason for s in report.skipped}


def test_captions_come_from_csv_first_then_sidecars(tmp_path: Path) -> None:
    data = tmp_path / "data"
    save_image(data / "a.png")
    save_image(data / "b.jpg")
    save_image(data / "sub" / "c.webp")
    write(data / "a.txt", "sidecar loses to the CSV")
    write(data / "sub" / "c.txt", "c from sidecar")
    csv = write(tmp_path / "metadata.csv", 'file,caption\na.png,"a, from csv"\nb.jpg,b from csv\n')

    images, report = scan_dataset(data, metadata_path=csv)

    assert {i.rel: i.caption for i in images} == {
        "a.png": "a, from csv",
        "b.jpg": "b from csv",
        "sub/c.webp": "c from sidecar",
    }
    assert (report.captions_from_csv, report.captions_from_sidecars, report.captions_generated) == (2, 1, 0)
    assert report.images_found == report.images_used == 3
    assert report.skipped == () and report.csv_problems == ()
    assert all(i.path.is_absolute() and i.path.is_file() for i in images)


def test_broken_files_are_skipped_with_reasons_and_the_rest_used(tmp_path: Path) -> None:
    data = tmp_path / "data"
    save_image(data / "good.png")
    save_image(data / "good2.jpg")
    write(data / "corrupt.png", "this is not a png")
    truncated_jpeg(data / "truncated.jpg")
    (data / "empty.png").write_bytes(b"")
    save_image(data / "uncaptioned.png")
    for name in ("good2", "corrupt", "truncated", "empty"):
        write(data / f"{name}.txt", "caption")
    csv = write(tmp_path / "metadata.csv", "file,caption\ngood.png,fine\nghost.png,missing file\n")

    images, report = scan_dataset(data, metadata_path=csv)

    assert [i.rel for i in images] == ["good.png", "good2.jpg"]
    assert reasons(report) == {
        "corrupt.png": "unreadable image: cannot identify image file",
        "truncated.jpg": "truncated image",
        "empty.png": "zero-size file",
        "uncaptioned.png": "no caption (add a metadata.csv row or <stem>.txt)",
    }
    assert report.csv_problems == ("metadata.csv line 3: file `ghost.png` does not exist in train_data_dir",)
    assert (report.images_found, report.images_used) == (6, 2)
    text = report.render()
    for skip in report.skipped:
        assert skip.path in text and skip.reason in text
    assert "ghost.png" in text


def test_nothing_usable_raises_with_the_full_report(tmp_path: Path) -> None:
    write(tmp_path / "broken.jpg", "garbage")
    truncated_jpeg(tmp_path / "half.jpg")
    with pytest.raises(DataError) as err:
        scan_dataset(tmp_path, metadata_path=None)
    message = str(err.value)
    assert "`train_data_dir`" in message and str(tmp_path) in message
    assert "broken.jpg: unreadable image" in message and "half.jpg: truncated image" in message
    assert "Fix or replace" in err.value.hint


def test_images_without_any_caption_hint_at_captions(tmp_path: Path) -> None:
    save_image(tmp_path / "cat.png")
    with pytest.raises(DataError) as err:
        scan_dataset(tmp_path, metadata_path=None)
    assert "cat.png: no caption" in str(err.value)
    assert "cat.txt" in err.value.hint


def test_empty_folder_hint_names_the_image_types(tmp_path: Path) -> None:
    write(tmp_path / "notes.md", "no images here")
    with pytest.raises(DataError) as err:
        scan_dataset(tmp_path, metadata_path=None)
    assert "0 image files found" in str(err.value)
    assert ".png" in err.value.hint and ".jpg" in err.value.hint


def test_missing_folder_and_metadata_file_name_their_keys(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"`train_data_dir`.*does not exist"):
        scan_dataset(tmp_path / "nope", metadata_path=None)
    not_a_folder = write(tmp_path / "file.txt", "x")
    with pytest.raises(DataError, match=r"`train_data_dir`.*not a folder"):
        scan_dataset(not_a_folder, metadata_path=None)
    with pytest.raises(DataError, match=r"`metadata_path`.*missing\.csv"):
        scan_dataset(tmp_path, metadata_path=tmp_path / "missing.csv")


def test_malformed_csv_stops_the_scan_naming_file_and_line(tmp_path: Path) -> None:
    save_image(tmp_path / "data" / "a.png")
    csv = write(tmp_path / "metadata.csv", "caption,file\na cat, unquoted,a.png\n")
    with pytest.raises(DataError, match=r"metadata\.csv line 2"):
        scan_dataset(tmp_path / "data", metadata_path=csv)


def test_kohya_folder_repeats_and_explicit_config_precedence(tmp_path: Path) -> None:
    for rel in ("top.png", "10_style/a.png", "10_style/deep/b.png", "3_other/c.png", "plain/d.png"):
        save_image(tmp_path / rel)
        write((tmp_path / rel).with_suffix(".txt"), "caption")

    images, report = scan_dataset(tmp_path, metadata_path=None)
    by_rel = {i.rel: i.repeats for i in images}
    assert by_rel == {
        "10_style/a.png": 10,
        "10_style/deep/b.png": 10,
        "3_other/c.png": 3,
        "plain/d.png": 1,
        "top.png": 1,
    }
    assert report.repeats_total == 25

    explicit = {"10_style": 2, "": 4}
    images, report = scan_dataset(tmp_path, metadata_path=None, repeats=explicit.get)
    by_rel = {i.rel: i.repeats for i in images}
    # Explicit setting beats the folder prefix; the most specific folder wins, so the top-level
    # default (4) applies where no nearer folder says anything.
    assert by_rel == {
        "10_style/a.png": 2,
        "10_style/deep/b.png": 2,
        "3_other/c.png": 3,
        "plain/d.png": 4,
        "top.png": 4,
    }
    assert report.repeats_total == 15


def test_invalid_explicit_repeats_is_refused(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    write(tmp_path / "a.txt", "caption")
    with pytest.raises(DataError, match="`repeats`"):
        scan_dataset(tmp_path, metadata_path=None, repeats=lambda folder: 0)


def test_hidden_files_cache_folders_and_other_files_are_ignored(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    write(tmp_path / "a.txt", "caption")
    save_image(tmp_path / ".hidden" / "x.png")
    save_image(tmp_path / "._a.png")
    save_image(tmp_path / ".lorad_cache" / "y.png")
    save_image(tmp_path / "latents" / "z.png")
    write(tmp_path / "latents" / "CACHEDIR.TAG", "Signature: 8a477f597d28d172789f06886806bc55\n")
    write(tmp_path / "readme.md", "not an image")
    save_image(tmp_path / "anim.gif")

    images, report = scan_dataset(tmp_path, metadata_path=None)
    assert [i.rel for i in images] == ["a.png"]
    # Image types lorad does not read are reported, not silently ignored.
    assert reasons(report) == {"anim.gif": "unsupported image type .gif (convert it to .png or .jpg)"}


def test_exif_orientation_gives_upright_size_and_pixels(tmp_path: Path) -> None:
    # Stored 64x32 with red left half, blue right half; orientation 6 = "rotate 90° clockwise
    # to display", so the upright image is 32x64 with red on top.
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    write(tmp_path / "phone.txt", "photo")

    (image,), _ = scan_dataset(tmp_path, metadata_path=None)
    assert (image.width, image.height) == (32, 64)

    pixels = load_image_for_bucket(image.path, (32, 64))
    assert pixels.shape == (3, 64, 32)
    top, bottom = pixels[:, 8, 16], pixels[:, 56, 16]
    assert top[0] > 0.8 and top[2] < -0.8  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8  # blue


def test_caption_missing_hook_fills_uncaptioned_images(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "c.png")
    write(tmp_path / "a.txt", "written by hand")
    calls: list[list[Path]] = []

    def generate(paths: list[Path]) -> dict[Path, str]:
        calls.append(paths)
        return {p: f"generated {p.stem}" for p in paths if p.stem == "b"}

    images, report = scan_dataset(tmp_path, metadata_path=None, caption_missing=generate)
    assert calls == [[tmp_path / "b.png", tmp_path / "c.png"]]
    assert {i.rel: i.caption for i in images} == {"a.png": "written by hand", "b.png": "generated b"}
    assert report.captions_generated == 1
    assert reasons(report) == {"c.png": "no caption (add a metadata.csv row or <stem>.txt)"}


def test_content_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "copy.txt", "y")
    images, _ = scan_dataset(tmp_path, metadata_path=None)
    expected = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert [i.content_hash for i in images] == [expected, expected]


def test_report_tag_frequency_json_and_long_skip_lists(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "5_dogs" / "b.png")
    save_image(tmp_path / "5_dogs" / "c.png")
    write(tmp_path / "a.txt", "ohwx, cat")
    write(tmp_path / "5_dogs" / "b.txt", "ohwx, dog, dog")
    write(tmp_path / "5_dogs" / "c.txt", "ohwx,  dog ,grass")
    for n in range(25):
        write(tmp_path / f"bad{n:02}.png", "garbage")

    _, report = scan_dataset(tmp_path, metadata_path=None)
    assert report.tag_frequency == {
        tmp_path.name: {"ohwx": 1, "cat": 1},
        "5_dogs": {"ohwx": 2, "dog": 2, "grass": 1},
    }
    text = report.render()
    assert "bad19.png" in text and "bad20.png" not in text and "... and 5 more" in text
    restored = json.loads(json.dumps(report.to_dict()))
    assert restored["images_used"] == 3 and restored["repeats_total"] == 11
    assert len(restored["skipped"]) == 25
    assert report.with_buckets({"512x512": 3}).to_dict()["buckets"] == {"512x512": 3}


def test_loaded_pixels_cover_the_bucket_center_cropped(tmp_path: Path) -> None:
    # 200x100: red | green (middle half) | blue. Covering a 64x64 bucket scales it to 128x64
    # and the center crop keeps exactly the green middle.
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (200, 100), RED)
    image.paste(GREEN, (50, 0, 150, 100))
    image.paste(BLUE, (150, 0, 200, 100))
    image.save(path)
    pixels = load_image_for_bucket(path, (64, 64))
    assert pixels.shape == (3, 64, 64) and pixels.dtype.is_floating_point
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    green = pixels[:, :, 2:62]  # away from the resampled edges
    assert float(green[1].min()) > 0.9 and float(green[0].max()) < -0.9


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    path = save_image(tmp_path / "clear.png", (64, 64), (255, 0, 0, 0))
    pixels = load_image_for_bucket(path, (64, 64))
    assert float(pixels.min()) == 1.0  # fully transparent red shows as white


def test_loading_a_file_broken_after_the_scan_is_a_data_error(tmp_path: Path) -> None:
    path = write(tmp_path / "gone.png", "garbage")
    with pytest.raises(DataError, match=r"gone\.png"):
        load_image_for_bucket(path, (64, 64))
