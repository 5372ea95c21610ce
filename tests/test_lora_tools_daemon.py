"""The LoRA toolbox over gRPC: a real daemon inspects, converts, resizes, merges, bakes and extracts files on
its machine, writing what the same tools write in-process, and refuses bad requests before any work."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file

from lorad.lora_tools.bake import bake_loras
from lorad.lora_tools.extract import extract_lora
from lorad.lora_tools.merge import merge_loras
from lorad.models.tiny import write_original_checkpoint
from lorad_client import LoradClient
from lorad_client.errors import LoradRpcError
from lorad_client.format import format_lora_report
from tests.support.lora_samples import write_kohya_sample


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-tools-daemon")
    return {
        "a": write_kohya_sample(root / "a.safetensors", tiny_sd, rank=4, alpha=2.0, seed=0),
        "b": write_kohya_sample(root / "b.safetensors", tiny_sd, rank=2, alpha=1.0, seed=1),
        "single": write_original_checkpoint(tiny_sd, root / "tiny.safetensors"),
    }


def _same_tensors(a: str | Path, b: str | Path) -> None:
    ours, theirs = load_file(str(a)), load_file(str(b))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and bool((value == theirs[key]).all()), key


def test_inspect_convert_resize_over_grpc(client: LoradClient, tmp_path: Path, files: dict[str, Path]) -> None:
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(files["a"].read_bytes())
    report = client.inspect_lora("a.safetensors", base_dir=tmp_path)
    assert (report.layout, report.family, report.modules, list(report.ranks)) == ("kohya", "sd1", 87, [4])
    assert report.path == str(lora) and report.base_version == "sd_v1" and dict(report.network_types) == {"lora": 87}
    assert {b.block for b in report.blocks} >= {"unet down_blocks.0", "unet mid_block", "te layer 1"}
    assert report.metadata["ss_output_name"] == "sample" and (report.top_tags[0].tag, report.top_tags[0].count) == (
        "zkw",
        8,
    )
    # The text every client shows is lorad_client.format's rendering of these fields.
    assert report.text == format_lora_report(report) and "Stable Diffusion 1.x" in report.text
    assert json.loads(report.json)["trigger_words"] == ["zkw"] and list(report.problems) == []
    converted = client.convert_lora(lora, to="diffusers", output=tmp_path / "d.safetensors")
    assert client.inspect_lora(converted).layout == "diffusers"
    resized = client.resize_lora(lora, output=tmp_path / "r", rank=2, layout="peft")
    assert "new rank 2" in resized.summary and client.inspect_lora(resized.output).layout == "peft"


def test_merge_bake_extract_write_what_the_tools_write(
    client: LoradClient, tmp_path: Path, files: dict[str, Path]
) -> None:
    a, b, single = files["a"], files["b"], files["single"]
    merged = client.merge_lora([(a, 0.7), (b, 0.3)], output=tmp_path / "merged.safetensors")
    assert (merged.modules, list(merged.ranks), merged.kept) == (87, [6], 1.0) and "rank 6" in merged.summary
    _same_tensors(merged.output, merge_loras([(a, 0.7), (b, 0.3)], tmp_path / "ref-merged.safetensors").output)
    low = client.merge_lora([a, b], output=tmp_path / "low.safetensors", rank=3)
    assert list(low.ranks) == [3] and 0 < low.kept < 1
    # Unset weights are 1, as on the command line.
    _same_tensors(low.output, merge_loras([(a, 1.0), (b, 1.0)], tmp_path / "ref-low.safetensors", rank=3).output)

    baked = client.bake_lora([(a, 0.8)], base=single, output=tmp_path / "baked.safetensors")
    assert baked.modules == 87 and baked.weights_changed > 0 and "baked into" in baked.summary
    reference = bake_loras([(a, 0.8)], single, tmp_path / "ref" / "baked.safetensors")
    assert Path(baked.output).read_bytes() == Path(reference.output).read_bytes()

    extracted = client.extract_lora(single, baked.output, output=tmp_path / "x.safetensors", rank=4, conv_rank=4)
    ref = extract_lora(single, Path(baked.output), tmp_path / "ref-x.safetensors", rank=4, conv_rank=4)
    assert extracted.modules == 87 and extracted.kept == pytest.approx(1.0)
    # The convolutions the LoRA did not adapt are the same in both checkpoints: left out, and counted.
    assert extracted.skipped_unchanged == ref.skipped_unchanged > 0
    _same_tensors(extracted.output, ref.output)


def _refused(call: object, *args: object, **kwargs: object) -> LoradRpcError:
    with pytest.raises(LoradRpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def test_bad_requests_are_refused_naming_each_field(
    client: LoradClient, tmp_path: Path, files: dict[str, Path]
) -> None:
    a, single = files["a"], files["single"]
    err = _refused(
        client.merge_lora, [(a, float("nan"))], output="out.safetensors", rank=-1, layout="onnx", base_dir=""
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("`loras`", "`loras[0].weight`", "`output`", "`rank`", "`layout`"):
        assert field in str(err), (field, str(err))
    assert "relative and no base_dir" in str(err)
    err = _refused(client.bake_lora, [a], base=single, output=single)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and f"is the input {single}" in str(err)
    err = _refused(client.extract_lora, single, "", output=tmp_path / "x.safetensors", rank=0, min_diff=-1)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(f in str(err) for f in ("`tuned`", "`rank`", "`min_diff`"))
    err = _refused(client.convert_lora, a, to="", output=tmp_path / "c.safetensors")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "use one of: kohya, diffusers, peft, comfyui" in str(err)
    err = _refused(client.inspect_lora, "a\0b")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in str(err)
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_tool_failures_are_failed_preconditions_and_the_daemon_stays_up(
    client: LoradClient, tmp_path: Path, files: dict[str, Path]
) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    err = _refused(client.inspect_lora, tmp_path / "junk.safetensors")
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "not a .safetensors file" in str(err)
    # A LoRA is no checkpoint to bake into; a folder is no checkpoint either.
    err = _refused(client.bake_lora, [files["a"]], base=files["b"], output=tmp_path / "o.safetensors")
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "not a single-file" in str(err)
    err = _refused(client.extract_lora, tmp_path, files["single"], output=tmp_path / "o.safetensors", rank=2)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "is a folder" in str(err)
    # An output under a file, not a folder: the write fails, named, with what to do.
    (tmp_path / "plain").write_text("")
    err = _refused(client.merge_lora, [files["a"], files["b"]], output=tmp_path / "plain" / "m.safetensors")
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "cannot write the merged LoRA" in str(err)
    assert "hint: Choose an output path" in str(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "plain"]
    assert client.status().version  # the daemon is still up
