"""Aspect-ratio buckets and the per-epoch batch plan."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lorad.data.buckets import assign_bucket, bucket_counts, make_buckets, plan_epoch
from lorad.data.dataset import load_image_for_bucket

BUCKETS = make_buckets(512, 256, 1024, 64)


def test_buckets_fit_the_area_and_step_and_include_the_square() -> None:
    assert (512, 512) in BUCKETS
    for w, h in BUCKETS:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in BUCKETS  # portrait and landscape alike
    assert (1024, 256) in BUCKETS and (576, 448) in BUCKETS


def test_bad_bucket_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        make_buckets(512, 250, 1024, 64)
    with pytest.raises(ValueError):
        make_buckets(128, 512, 1024, 64)  # no bucket of side >= 512 fits 128x128


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 1000), (512, 512)),
        ((1920, 1080), (640, 384)),
        ((1080, 1920), (384, 640)),
        ((3000, 800), (960, 256)),
    ],
)
def test_images_go_to_the_bucket_of_nearest_aspect(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert assign_bucket(*size, buckets=BUCKETS, resolution=512, step=64, no_upscale=False) == expected


def test_no_upscale_gives_small_images_their_own_bucket_rounded_down() -> None:
    assert assign_bucket(300, 200, buckets=BUCKETS, resolution=512, step=64, no_upscale=True) == (256, 192)
    # Without no_upscale the same image would be enlarged to a full-size bucket.
    assert assign_bucket(300, 200, buckets=BUCKETS, resolution=512, step=64, no_upscale=False) == (640, 384)
    # Large images still use the normal buckets.
    assert assign_bucket(2000, 2000, buckets=BUCKETS, resolution=512, step=64, no_upscale=True) == (512, 512)


def test_no_upscale_never_enlarges_pixels(tmp_path: Path) -> None:
    rng = random.Random(1)
    path = tmp_path / "small.png"
    for _ in range(20):
        w, h = rng.randrange(64, 512), rng.randrange(64, 512)
        bucket = assign_bucket(w, h, buckets=BUCKETS, resolution=512, step=64, no_upscale=True)
        assert bucket[0] <= w and bucket[1] <= h
    # The loader crops such an image without resampling: its pixels come through unchanged.
    width, height = 128, 70
    pattern = bytes((x * 7 + y) % 256 for y in range(height) for x in range(width) for _ in range(3))
    Image.frombytes("RGB", (width, height), pattern).save(path)
    bucket = assign_bucket(width, height, buckets=BUCKETS, resolution=512, step=64, no_upscale=True)
    assert bucket == (128, 64)
    pixels = load_image_for_bucket(path, bucket)
    assert pixels.shape == (3, 64, 128)
    top = (height - 64) // 2
    for x, y in [(0, 0), (127, 63), (40, 17)]:
        assert abs(float(pixels[0, y, x]) - (((x * 7 + y + top) % 256) / 127.5 - 1)) < 1e-6


def test_bucket_counts_names_buckets_w_x_h() -> None:
    assert bucket_counts([(512, 512), (576, 448), (512, 512)]) == {"512x512": 2, "576x448": 1}


def sample_buckets() -> list[tuple[int, int]]:
    rng = random.Random(5)
    return [rng.choice([(512, 512), (576, 448), (448, 576), (640, 384)]) for _ in range(101)]


def test_plan_covers_every_index_once_in_single_bucket_batches() -> None:
    bucket_of = sample_buckets()
    plan = plan_epoch(bucket_of, 4, seed=42, epoch=0)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(bucket_of)))
    for batch in plan:
        assert 1 <= len(batch) <= 4
        assert len({bucket_of[i] for i in batch}) == 1
    # Small leftover batches are kept, not dropped: one per bucket at most.
    assert sum(len(b) < 4 for b in plan) <= len(set(bucket_of))


def test_plan_is_deterministic_per_seed_and_epoch() -> None:
    bucket_of = sample_buckets()
    assert plan_epoch(bucket_of, 4, seed=42, epoch=3) == plan_epoch(bucket_of, 4, seed=42, epoch=3)
    assert plan_epoch(bucket_of, 4, seed=42, epoch=3) != plan_epoch(bucket_of, 4, seed=42, epoch=4)
    assert plan_epoch(bucket_of, 4, seed=42, epoch=3) != plan_epoch(bucket_of, 4, seed=43, epoch=3)


def test_plan_is_the_same_in_another_process() -> None:
    bucket_of = sample_buckets()
    code = (
        "import json, sys; from lorad.data.buckets import plan_epoch; "
        "b = [tuple(x) for x in json.loads(sys.stdin.read())]; "
        "print(json.dumps(plan_epoch(b, 4, seed=42, epoch=3)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(bucket_of),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert json.loads(out) == plan_epoch(bucket_of, 4, seed=42, epoch=3)
