"""SDXL conditioning: both text encoders as diffusers' SDXL pipeline encodes prompts, and the size/crop
time ids, checked against the pixels the bucket loader keeps and against kohya's values."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorad.data.captions import prepare_caption
from lorad.data.dataset import load_image_for_bucket
from lorad.families.sdxl.conditioning import HIDDEN, POOLED, encode_prompts, time_ids, time_ids_tensor
from lorad.models.sdxl_components import SDXLComponents
from lorad.models.sdxl_loader import load_sdxl_components
from lorad.models.tiny_sdxl import TINY_CONTEXT_DIM, TINY_POOLED_DIM, build_tiny_sdxl

CAPTIONS = ["a photo of a red cat", "a landscape painting of green hills"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("cond") / "sdxl")


@pytest.fixture(scope="module")
def sdxl(folder: Path) -> SDXLComponents:
    return load_sdxl_components(str(folder))


def _encode(c: SDXLComponents, captions: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return encode_prompts(
            captions,
            tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2,
            text_encoder=c.text_encoder,
            text_encoder_2=c.text_encoder_2,
            device=torch.device("cpu"),
        )


def test_prompts_encode_as_the_sdxl_pipeline_does(folder: Path, sdxl: SDXLComponents) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    got = _encode(sdxl, CAPTIONS)
    assert got[HIDDEN].shape == (2, 77, TINY_CONTEXT_DIM) and got[POOLED].shape == (2, TINY_POOLED_DIM)
    assert torch.allclose(got[HIDDEN], embeds, atol=1e-6)
    assert torch.allclose(got[POOLED], pooled, atol=1e-6)
    # Penultimate layers, not the last: the last layer's output would differ.
    ids = sdxl.tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        last = sdxl.text_encoder(ids).last_hidden_state
    assert not torch.allclose(got[HIDDEN][..., : last.shape[-1]], last, atol=1e-4)


def test_caption_dropout_blanks_both_encoders(sdxl: SDXLComponents) -> None:
    dropped = prepare_caption(
        "ohwx, a red cat", rng=random.Random(0), shuffle=False, keep_tokens=0, dropout=1.0, trigger_word="ohwx"
    )
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        encoder.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, encoder in (("te1", sdxl.text_encoder), ("te2", sdxl.text_encoder_2))
    ]
    try:
        blank = _encode(sdxl, [dropped])
    finally:
        for hook in hooks:
            hook.remove()
    assert dropped == ""
    empty_1 = sdxl.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty_2 = sdxl.tokenizer_2([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(seen["te1"], empty_1) and torch.equal(seen["te2"], empty_2)
    assert not torch.allclose(blank[HIDDEN], _encode(sdxl, ["ohwx, a red cat"])[HIDDEN])


def _gradient_image(path: Path, size: tuple[int, int], axis: int) -> Path:
    """An image whose red channel counts pixels along ``axis`` (0: columns, 1: rows), for locating a crop."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x if axis == 0 else y) % 256, 128, 128) for y in range(height) for x in range(width)])
    image.save(path)
    return path


@pytest.mark.parametrize(
    ("size", "bucket", "expected", "axis"),
    [
        ((200, 100), (64, 64), (100, 200, 0, 32, 64, 64), 0),  # wide image, square bucket: crop left/right
        ((90, 240), (64, 128), (240, 90, 21, 0, 128, 64), 1),  # tall image, tall bucket: crop top/bottom
    ],
)
def test_time_ids_are_exact_for_a_cropped_bucket(
    tmp_path: Path, size: tuple[int, int], bucket: tuple[int, int], expected: tuple[int, ...], axis: int
) -> None:
    assert time_ids(*size, bucket) == expected
    # The crop the ids report is where the kept pixels came from: the first kept column (row) of a
    # gradient image, scaled back, lands at the reported crop offset.
    pixels = load_image_for_bucket(_gradient_image(tmp_path / "g.png", size, axis), bucket)
    red = (pixels[0] + 1) * 127.5
    first = float(red[0, 1:-1].mean() if axis == 1 else red[1:-1, 0].mean())
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    offset = expected[3] if axis == 0 else expected[2]
    assert abs((first + 0.5) * scale - 0.5 - offset) < 1.0


def kohya_time_ids(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, ...]:
    """kohya's values, restated from library/train_util.py (``BucketManager.get_crop_ltrb`` and the
    dataset's ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw``), no flip."""
    bucket_ar, image_ar = bucket[0] / bucket[1], size[0] / size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    crop_left, crop_top = (bucket[0] - resized_w) // 2, (bucket[1] - resized_h) // 2
    return (size[1], size[0], int(crop_top), int(crop_left), bucket[1], bucket[0])


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((1024, 1024), (1024, 1024)), ((3000, 2000), (1152, 768)), ((768, 1344), (768, 1344)), ((640, 480), (512, 384))],
)
def test_time_ids_equal_kohyas_when_nothing_is_cropped(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert time_ids(*size, bucket) == kohya_time_ids(size, bucket)
    assert time_ids(*size, bucket)[2:4] == (0, 0)


def test_time_ids_differ_from_kohyas_only_in_the_crop_of_a_cropped_bucket() -> None:
    ours, kohya = time_ids(200, 100, (64, 64)), kohya_time_ids((200, 100), (64, 64))
    assert ours[:2] == kohya[:2] and ours[4:] == kohya[4:]  # original and target sizes agree
    # kohya reports a 16 px top margin of the image fitted inside the bucket; the image actually
    # lost 32 px on the left (and right) of its 128x64 scaled copy, which lorad reports.
    assert (kohya[2:4], ours[2:4]) == ((16, 0), (0, 32))


def test_unet_takes_the_conditioning_and_the_time_ids_matter(sdxl: SDXLComponents) -> None:
    encoded = _encode(sdxl, CAPTIONS)
    ids = time_ids_tensor([time_ids(200, 100, (64, 64)), time_ids(64, 64, (64, 64))], device="cpu", dtype=torch.float32)
    assert ids.shape == (2, 6)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(time: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            added = {"text_embeds": encoded[POOLED], "time_ids": time}
            return sdxl.unet(sample, torch.tensor([10, 900]), encoded[HIDDEN], added_cond_kwargs=added).sample

    out = run(ids)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, run(ids.flip(0)))


def test_time_ids_follow_a_mirror_and_a_random_crop() -> None:
    # 201x100 into 64x64: scaled to 129x64, the centre window starts 32 px from the left and 33 from the
    # right; mirrored, the window's left edge is 33 px in.
    assert time_ids(201, 100, (64, 64)) == (100, 201, 0, 32, 64, 64)
    assert time_ids(201, 100, (64, 64), flipped=True) == (100, 201, 0, 33, 64, 64)
    # random_crop: the window the sample was cut at, as drawn.
    assert time_ids(201, 100, (64, 64), crop=(0, 56)) == (100, 201, 0, 56, 64, 64)
