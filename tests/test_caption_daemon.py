"""Captioning through a real daemon: the CaptionImages stream, resident captioners, the CLI, and a
training job that captions its missing captions first."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from PIL import Image

from lorad.cli import main
from lorad.data.captions import read_metadata_csv
from lorad.models.tiny_captioners import build_tiny_wd14
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import caption_pb2, jobs_pb2
from lorad_client import LoradClient, LoradRpcError
from tests.support.datasets import make_dataset, tiny_train_values


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("captioners") / "wd14")


def folder_of(root: Path) -> Path:
    for name, colour in (("red.png", (230, 20, 20)), ("green.png", (20, 230, 20)), ("sub/blue.png", (20, 20, 230))):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "green.txt").write_text("a person's caption\n")
    return root


def test_the_stream_yields_one_result_per_image_and_a_summary(
    client: LoradClient, daemon: RunningDaemon, tagger: Path, tmp_path: Path
) -> None:
    folder = folder_of(tmp_path / "data")
    stream = client.caption_images(
        "data",
        base_dir=tmp_path,
        captioner=caption_pb2.CAPTIONER_KIND_WD14,
        model=str(tagger),
        trigger_word="ohwx",
        batch_size=2,
    )
    messages = list(stream)
    items = [m.WhichOneof("item") for m in messages]
    assert items[0] == "planned" and items[-1] == "finished" and items.count("captioner_ready") == 1
    images = {m.image.path: m.image for m in messages if m.HasField("image")}
    assert sorted(images) == ["broken.png", "green.png", "red.png", "sub/blue.png"]
    assert [m.image.done for m in messages if m.HasField("image")] == [1, 2, 3, 4]
    assert images["green.png"].status == caption_pb2.CAPTION_STATUS_KEPT
    assert images["broken.png"].status == caption_pb2.CAPTION_STATUS_FAILED and images["broken.png"].error
    assert images["red.png"].caption == "ohwx, tiny hero, red theme, simple background, ^_^"
    assert (folder / "sub" / "blue.txt").read_text() == "ohwx, tiny hero, blue theme, simple background, ^_^\n"
    finished = messages[-1].finished
    assert (finished.captioned, finished.kept, finished.failed) == (2, 1, 1)
    assert finished.format == caption_pb2.CAPTION_FORMAT_TXT and finished.record_path.endswith(".lorad_captions.json")
    ready = messages[items.index("captioner_ready")].captioner_ready
    assert not ready.resident

    # The captioner stays resident: listed among the models, and the next request does not load it.
    (resident,) = [m for m in client.list_models() if m.kind == "wd14"]
    assert resident.model_id == ready.model_id and resident.source == str(tagger) and resident.memory_bytes > 0
    again = list(
        client.caption_images(
            folder, base_dir=tmp_path, captioner=caption_pb2.CAPTIONER_KIND_WD14, model=str(tagger), overwrite=True
        )
    )
    assert next(m.captioner_ready for m in again if m.HasField("captioner_ready")).resident
    assert again[-1].finished.captioned == 3
    assert client.unload_model(str(tagger)) > 0


def test_bad_requests_and_models_are_refused_with_the_reason(client: LoradClient, tagger: Path, tmp_path: Path) -> None:
    folder_of(tmp_path / "data")
    with pytest.raises(LoradRpcError) as err:
        list(client.caption_images("nowhere", base_dir=tmp_path, batch_size=-1))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`folder`: {tmp_path}/nowhere does not exist" in str(err.value) and "`batch_size`: got -1" in str(err.value)

    incomplete = tmp_path / "half-tagger"
    incomplete.mkdir()
    (incomplete / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    with pytest.raises(LoradRpcError) as err:
        list(
            client.caption_images(
                "data", base_dir=tmp_path, captioner=caption_pb2.CAPTIONER_KIND_WD14, model="half-tagger"
            )
        )
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"`model`: {incomplete} is not a complete WD14 tagger model folder: it lacks selected_tags.csv" in str(
        err.value
    )
    assert "hint:" in str(err.value)


@pytest.fixture
def use_daemon(daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> RunningDaemon:
    monkeypatch.setenv("LORAD_HOME", str(daemon.settings.home))
    monkeypatch.delenv("LORAD_ADDRESS")
    return daemon


def test_lorad_caption_goes_through_the_daemon(
    use_daemon: RunningDaemon,
    tagger: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = folder_of(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "caption",
            "data",
            "--captioner",
            "wd14",
            "--model",
            str(tagger),
            "--format",
            "csv",
            "--general-threshold",
            "0.8",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1  # broken.png could not be captioned
    assert "no lorad daemon running" not in err and "broken.png: unreadable image" in err
    assert "done: 2 captioned, 1 kept, 1 failed" in out
    assert dict(read_metadata_csv(folder / "metadata.csv").captions) == {
        "red.png": "tiny hero, red theme",
        "sub/blue.png": "tiny hero, blue theme",
    }

    code = main(["models"])
    out, _ = capsys.readouterr()
    assert code == 0 and "wd14" in out.splitlines()[1] and str(tagger) in out


@pytest.mark.slow
def test_a_daemon_job_captions_its_missing_captions_then_trains(
    client: LoradClient, daemon: RunningDaemon, tiny_sd: Path, tagger: Path, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "data", 6, csv=False)
    for index in (1, 3, 5):
        (data / f"img_{index:02d}.txt").unlink()
    values = tiny_train_values(
        tiny_sd, data, tmp_path / "out", captioner="wd14", captioner_model=str(tagger), max_train_steps=1
    )
    del values["metadata_path"]  # sidecars: the generated captions go beside the images
    config = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    job = client.submit_training(config, base_dir=tmp_path)
    events = [m.event for m in client.watch_job(job.job_id) if m.HasField("event")]
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[-1] == "finished", [e.failed for e in events if e.HasField("failed")]
    report = next(e.data_report for e in events if e.HasField("data_report"))
    assert (report.images_used, report.captions_generated) == (6, 3)
    assert any(e.log.message.startswith("generated 3 captions with wd14") for e in events if e.HasField("log"))
    assert all((data / f"img_{i:02d}.txt").read_text().startswith("tiny hero, ") for i in (1, 3, 5))
    assert client.get_job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert {m.kind for m in client.list_models()} == {"sd", "wd14"}
