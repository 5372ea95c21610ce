"""The LoRA toolbox over gRPC: a real daemon inspects, converts and resizes files on its machine."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from lorad_client import LoradClient
from lorad_client.errors import LoradRpcError
from tests.lora_samples import write_kohya_sample


def test_inspect_convert_resize_over_grpc(client: LoradClient, tmp_path: Path, tiny_sd: Path) -> None:
    lora = write_kohya_sample(tmp_path / "a.safetensors", tiny_sd)
    report = client.inspect_lora("a.safetensors", base_dir=tmp_path)
    assert (report.layout, report.family, report.modules, list(report.ranks)) == ("kohya", "sd1", 87, [4])
    assert "Stable Diffusion 1.x" in report.text and json.loads(report.json)["trigger_words"] == ["zkw"]
    assert list(report.problems) == []
    converted = client.convert_lora(lora, to="diffusers", output=tmp_path / "d.safetensors")
    assert client.inspect_lora(converted).layout == "diffusers"
    resized = client.resize_lora(lora, output=tmp_path / "r.safetensors", rank=2)
    assert "new rank 2" in resized.summary


def test_unreadable_file_is_a_failed_precondition(client: LoradClient, tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LoradRpcError) as info:
        client.inspect_lora(tmp_path / "junk.safetensors")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not a .safetensors file" in str(info.value)
    assert client.status().version  # the daemon is still up
