"""The latent cache: hits after put, persistence across instances, and safe misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lorad.data.dataset import scan_dataset
from lorad.data.latent_cache import MEAN, STD, LatentCache
from lorad.errors import OutputError

HASH = "ab" * 32
BUCKET = (512, 512)


def latents(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    # Like a VAE posterior: mean and std are two halves of one tensor (shared storage).
    moments = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    mean, std = moments.chunk(2, dim=1)
    return {MEAN: mean, STD: std}


def assert_same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> None:
    assert a is not None and a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name])


def test_get_after_put_is_a_hit_and_counts(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path / "cache", "sd15-vae:fp32")
    assert cache.get(HASH, BUCKET) is None
    cache.put(HASH, BUCKET, latents())
    assert_same(cache.get(HASH, BUCKET), latents())
    assert (cache.hits, cache.misses, cache.writes) == (1, 1, 1)


def test_entries_survive_a_new_instance_on_the_same_folder(tmp_path: Path) -> None:
    LatentCache(tmp_path, "vae").put(HASH, BUCKET, latents(dtype=torch.float16))
    later = LatentCache(tmp_path, "vae")
    assert_same(later.get(HASH, BUCKET), latents(dtype=torch.float16))
    assert (later.hits, later.misses, later.writes) == (1, 0, 0)


def test_other_vae_bucket_or_image_misses(tmp_path: Path) -> None:
    LatentCache(tmp_path, "vae-a").put(HASH, BUCKET, latents())
    assert LatentCache(tmp_path, "vae-b").get(HASH, BUCKET) is None
    same_vae = LatentCache(tmp_path, "vae-a")
    assert same_vae.get(HASH, (576, 448)) is None
    assert same_vae.get("cd" * 32, BUCKET) is None
    assert same_vae.misses == 2


def test_corrupt_file_is_a_miss_and_is_replaced_by_the_next_put(tmp_path: Path) -> None:
    LatentCache(tmp_path, "vae").put(HASH, BUCKET, latents())
    cache = LatentCache(tmp_path, "vae")
    path = cache.path_for(HASH, BUCKET)
    assert path is not None and path.is_file()
    path.write_bytes(path.read_bytes()[:40])  # truncated, as after a crash or full disk
    assert cache.get(HASH, BUCKET) is None
    assert not path.exists()
    cache.put(HASH, BUCKET, latents(1))
    assert_same(LatentCache(tmp_path, "vae").get(HASH, BUCKET), latents(1))


def test_returned_tensors_are_copies(tmp_path: Path) -> None:
    cache = LatentCache(None, "vae")
    cache.put(HASH, BUCKET, latents())
    first = cache.get(HASH, BUCKET)
    assert first is not None
    first[MEAN].mul_(0.18215)  # a caller scaling in place must not change the cache
    assert_same(cache.get(HASH, BUCKET), latents())


def test_memory_only_cache_writes_no_files(tmp_path: Path) -> None:
    cache = LatentCache(None, "vae")
    cache.put(HASH, BUCKET, latents())
    assert cache.get(HASH, BUCKET) is not None
    assert cache.writes == 0 and cache.path_for(HASH, BUCKET) is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_dir_names_the_key_and_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(OutputError) as err:
        LatentCache(blocker / "cache", "vae")
    assert "`cache_dir`" in str(err.value) and str(blocker / "cache") in str(err.value)
    assert err.value.hint


def test_cache_folder_inside_the_training_folder_is_not_scanned(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("caption")
    cache = LatentCache(tmp_path / "latents", "vae")
    cache.put(HASH, BUCKET, latents())
    Image.new("RGB", (16, 16)).save(tmp_path / "latents" / "stray.png")
    images, _ = scan_dataset(tmp_path, metadata_path=None)
    assert [i.rel for i in images] == ["a.png"]
