"""Files: errors never show a file's text, the daemon writes only where it was asked (never through
a link that leaves the folder, never over the images), and pickle weights load only with opt-in,
on every path that loads a model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lorad.captioning.captioner import CaptionerKey, load_captioner
from lorad.captioning.errors import CaptionModelError
from lorad.captioning.request import caption_request
from lorad.captioning.writer import CaptionWriter
from lorad.errors import ConfigError, DataError, ModelLoadError
from lorad.models.registry import ModelKey
from lorad.paths import token_path
from lorad.server.daemon import RunningDaemon
from lorad_api.v1 import jobs_pb2
from lorad_client import LoradClient, LoradRpcError
from tests.support.datasets import draw_image, make_dataset, tiny_train_values, write_jsonl

CANARY = "LEAKCANARY7f3a9c"
SECRET_LINES = (
    f"root:$6$saltsalt${CANARY}hash:19000:0:99999:7:::\n{CANARY}-a-token-on-its-own-line\napi_key: {CANARY}\n"
)
FINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "shadow"
    path.parent.mkdir()
    path.write_text(SECRET_LINES)
    return path


def _lorad(*args: str) -> subprocess.CompletedProcess:
    """Run the `lorad` command line in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "lorad.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _rpc_error_text(call) -> str:
    with pytest.raises(LoradRpcError) as err:
        call()
    assert err.value.code != grpc.StatusCode.INTERNAL, str(err.value)
    return str(err.value)


def _job_texts(client: LoradClient, job_id: str) -> str:
    """Everything a client can read about a job once it ended: its record and every event."""
    deadline = time.monotonic() + 180
    while (job := client.get_job(job_id)).state not in FINAL:
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.2)
    events = [str(message) for message in client.watch_job(job_id, history_only=True)]
    return str(job) + "".join(events)


def test_errors_never_show_a_files_text(
    client: LoradClient, daemon: RunningDaemon, secret: Path, tmp_path: Path
) -> None:
    token = token_path(daemon.settings.home).read_text().strip()
    data = make_dataset(tmp_path / "data", count=2)
    seen: list[str] = []

    # AddWatch reads config_path: a password file, the daemon's own token.
    for template in (secret, token_path(daemon.settings.home)):
        seen.append(_rpc_error_text(lambda t=template: client.add_watch(str(data), str(t), base_dir="/")))
    # Training reads metadata_path (SD) and train_data (LLM): the jobs fail, saying so without the text.
    sd = {"train_data_dir": str(data), "base_model": str(tmp_path / "m.safetensors"), "output_dir": str(tmp_path / "o")}
    for csv in (secret, token_path(daemon.settings.home)):
        job = client.submit_training_fields(sd | {"metadata_path": str(csv)}, base_dir=tmp_path)
        seen.append(_job_texts(client, job.job_id))
    for suffix in (".jsonl", ".json", ".csv"):
        records = shutil.copy(secret, tmp_path / f"records{suffix}")
        fields = {"task": "llm", "train_data": records, "base_model": str(tmp_path), "output_dir": str(tmp_path / "l")}
        seen.append(_job_texts(client, client.submit_training_fields(fields, base_dir=tmp_path).job_id))
    # Captions: a sidecar linked to the secret is not read; a metadata.csv that is the secret is not shown.
    linked = tmp_path / "linked"
    linked.mkdir()
    draw_image(linked / "a.png", "red", "circle")
    (linked / "a.txt").symlink_to(secret)
    listed = client.list_captions(str(linked), base_dir="/")
    assert [row.caption for row in listed.rows] == [""] and "outside its folder" in listed.rows[0].error
    seen.append(str(listed))
    as_csv = tmp_path / "as-csv"
    as_csv.mkdir()
    draw_image(as_csv / "a.png", "red", "circle")
    (as_csv / "metadata.csv").symlink_to(secret)
    seen.append(_rpc_error_text(lambda: client.list_captions(str(as_csv), base_dir="/")))
    seen.append(_rpc_error_text(lambda: client.set_captions(str(as_csv), {"a.png": "x"}, base_dir="/")))
    seen.append(_rpc_error_text(lambda: list(client.caption_images(str(as_csv), base_dir="/"))))
    # LoadModel reads base_model's header.
    fake_weights = shutil.copy(secret, tmp_path / "model.safetensors")
    seen.append(_rpc_error_text(lambda: client.load_model(str(fake_weights), base_dir="/", device="cpu")))
    # The CLI's own check reads the file given.
    check = _lorad("config", "--check", str(secret))
    assert check.returncode != 0
    seen.append(check.stdout + check.stderr)

    assert len(seen) == 13
    for text in seen:
        assert CANARY not in text and token not in text, text


def test_a_clip_vocabulary_that_is_another_file_is_not_shown(tmp_path: Path) -> None:
    from lorad.captioning.clip_ranking import VocabularyError, read_vocabulary

    bracketed = tmp_path / "bracketed.txt"
    bracketed.write_text(f"[{CANARY}\n")
    with pytest.raises(VocabularyError) as err:
        read_vocabulary(bracketed)
    assert CANARY not in str(err.value) and "line 1" in str(err.value)


# --- writes stay inside the folder ----------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder the daemon was never asked to write into, with an image of its own."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    draw_image(folder / "theirs.png", "blue", "square")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_captioner_never_writes_metadata_outside_the_training_folder(
    client: LoradClient, tmp_path: Path, outside: Path
) -> None:
    data = make_dataset(tmp_path / "data", count=2, csv=False)
    target = outside / "authorized_keys"
    fields = {
        "train_data_dir": str(data),
        "base_model": str(tmp_path / "m.safetensors"),
        "output_dir": str(tmp_path / "o"),
        "captioner": "blip",
        "metadata_path": str(target),
    }
    with pytest.raises(LoradRpcError) as err:
        client.submit_training_fields(fields, base_dir=tmp_path)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "`metadata_path`" in str(err.value)
    assert "outside train_data_dir" in str(err.value)
    assert not target.exists()
    with pytest.raises(DataError, match="outside"):
        CaptionWriter(data, format="csv", captioner="blip", model="m", csv_path=target)
    assert not target.exists()


def test_set_captions_never_writes_through_links_that_leave_the_folder(
    client: LoradClient, tmp_path: Path, outside: Path
) -> None:
    data = make_dataset(tmp_path / "data", count=2, csv=False)
    (data / "sub").symlink_to(outside)  # a linked subfolder: its image is listed, its sidecar is outside
    before = _files(outside)
    with pytest.raises(LoradRpcError) as err:
        client.set_captions(str(data), {"sub/theirs.png": "ssh-ed25519 AAAA planted"}, base_dir="/")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in str(err.value)
    # A sidecar that is a link to a file elsewhere is not written through (nor replaced).
    victim = outside / "victim.txt"
    victim.write_text("theirs\n")
    (data / "img_00.txt").unlink()
    (data / "img_00.txt").symlink_to(victim)
    with pytest.raises(LoradRpcError) as err:
        client.set_captions(str(data), {"img_00.png": "planted"}, base_dir="/")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(outside) == before | {"victim.txt": b"theirs\n"}
    assert (data / "img_00.txt").is_symlink()
    writer = CaptionWriter(data, format="txt", captioner="", model="")
    with pytest.raises(DataError, match="outside"):
        writer.write({data / "sub" / "theirs.png": "planted"})
    assert _files(outside) == before | {"victim.txt": b"theirs\n"}


def test_captioning_reports_images_in_linked_folders_instead_of_writing_there(
    client: LoradClient, tmp_path: Path, outside: Path, pickled_models: dict
) -> None:
    data = make_dataset(tmp_path / "data", count=2, csv=False)  # captioned already: no model is loaded
    (data / "sub").symlink_to(outside)
    before = _files(outside)
    updates = list(client.caption_images(str(data), base_dir="/", model=str(pickled_models["blip"]), allow_pickle=True))
    reported = [u.image for u in updates if u.WhichOneof("item") == "image" and u.image.path == "sub/theirs.png"]
    assert reported and "outside the folder" in reported[0].error
    assert _files(outside) == before


def test_an_image_extension_is_never_a_caption_extension(client: LoradClient, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", count=3, csv=False)
    before = _files(data)
    for extension in (".png", "PNG", ".jpg", ".webp", ".gif", "../x", ".txt/.."):
        for call in (
            lambda e=extension: client.list_captions(str(data), base_dir="/", caption_extension=e),
            lambda e=extension: client.set_captions(str(data), {"img_00.png": "x"}, base_dir="/", caption_extension=e),
            lambda e=extension: list(client.caption_images(str(data), base_dir="/", caption_extension=e)),
        ):
            with pytest.raises(LoradRpcError) as err:
                call()
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "caption_extension" in str(err.value)
    cli = _lorad("caption", str(data), "--caption-extension", ".png", "--embedded")
    assert cli.returncode != 0 and "--caption-extension" in cli.stderr and "image extension" in cli.stderr
    config = tmp_path / "c.yaml"
    config.write_text(f"train_data_dir: {data}\nbase_model: m.safetensors\noutput_dir: o\ncaption_extension: .png\n")
    check = _lorad("config", "--check", str(config))
    assert check.returncode != 0 and "`caption_extension`" in check.stdout + check.stderr
    assert _files(data) == before  # the images (and their captions) are untouched


# --- pickle ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_models(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path, tiny_llm: Path) -> Iterator[dict]:
    """Real tiny models whose weights exist only as pickle files (.bin)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoModelForCausalLM, BlipForConditionalGeneration

    from lorad.models.tiny_captioners import build_tiny_blip

    root = tmp_path_factory.mktemp("pickled")
    sd = root / "sd"
    shutil.copytree(tiny_sd, sd)
    shutil.rmtree(sd / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(sd / "unet", safe_serialization=False)
    llm = root / "llm"
    shutil.copytree(tiny_llm, llm)
    for weights in llm.glob("*.safetensors"):
        weights.unlink()
    # transformers 5 saves safetensors whatever it is told: write the pickle the way older tools did.
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llm).state_dict(), llm / "pytorch_model.bin")
    blip = build_tiny_blip(root / "blip")
    model = BlipForConditionalGeneration.from_pretrained(blip)
    (blip / "model.safetensors").unlink()
    torch.save(model.state_dict(), blip / "pytorch_model.bin")
    yield {"sd": sd, "llm": llm, "blip": blip}


@pytest.mark.slow
def test_pickle_needs_opt_in_on_every_daemon_path(
    client: LoradClient, pickled_models: dict, tmp_path: Path, dataset: Path
) -> None:
    single = tmp_path / "model.ckpt"
    single.write_bytes(b"not read")
    out = str(tmp_path / "out")
    sd = {"train_data_dir": str(dataset), "output_dir": out, "device": "cpu"}
    refused = {
        "SD single file": lambda: client.submit_training_fields(sd | {"base_model": str(single)}, base_dir=tmp_path),
        "SD folder of .bin": lambda: client.submit_training_fields(
            sd | {"base_model": str(pickled_models["sd"])}, base_dir=tmp_path
        ),
        "LoadModel SD folder": lambda: client.load_model(str(pickled_models["sd"]), base_dir="/", device="cpu"),
        "LLM pytorch_model.bin": lambda: client.submit_training_fields(
            {"task": "llm", "train_data": str(write_jsonl(tmp_path / "r.jsonl", [{"text": "hi"}]))}
            | {"base_model": str(pickled_models["llm"]), "output_dir": out},
            base_dir=tmp_path,
        ),
        "LoadModel LLM": lambda: client.load_model(str(pickled_models["llm"]), base_dir="/", device="cpu"),
        "captioner in a config": lambda: client.submit_training_fields(
            sd
            | {"base_model": str(tmp_path / "m.safetensors")}
            | {"captioner": "blip", "captioner_model": str(pickled_models["blip"])},
            base_dir=tmp_path,
        ),
        "CaptionImages": lambda: list(
            client.caption_images(str(dataset), base_dir="/", model=str(pickled_models["blip"]), overwrite=True)
        ),
    }
    for name, call in refused.items():
        with pytest.raises(LoradRpcError) as err:
            call()
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (name, str(err.value))
        assert "pickle" in str(err.value) and "allow_pickle" in str(err.value), name
    assert client.list_models() == [] and client.list_jobs() == []
    # With the opt-in the same requests are accepted.
    values = tiny_train_values(pickled_models["sd"], dataset, tmp_path / "ok", allow_pickle=True, max_train_steps=1)
    job = client.submit_training_fields(
        {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, base_dir="/"
    )
    assert _job_texts(client, job.job_id) and client.get_job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED, (
        client.get_job(job.job_id).error
    )


def test_loaders_refuse_pickle_without_opt_in_even_when_asked_directly(
    pickled_models: dict, daemon: RunningDaemon
) -> None:
    """The loaders hold the rule too, so no path depends on the config check having run first."""
    import torch

    from lorad.families.llm.model import load_llm
    from lorad.models.residents import load_model  # every registry's loader: the workers' and the daemon's
    from lorad.training.placement import Placement

    key = ModelKey(base_model=str(pickled_models["sd"]), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(key)
    assert load_model(ModelKey(**{**key.__dict__, "allow_pickle": True})).unet is not None
    placement = Placement(device=torch.device("cpu"), autocast_dtype=None, weight_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_llm(str(pickled_models["llm"]), placement)
    assert load_llm(str(pickled_models["llm"]), placement, allow_pickle=True).model is not None
    blip = CaptionerKey("blip", str(pickled_models["blip"]), "cpu", "float32")
    with pytest.raises(CaptionModelError):
        load_captioner(blip)
    assert load_captioner(CaptionerKey(**{**blip.__dict__, "allow_pickle": True})).kind == "blip"
    with pytest.raises(ConfigError, match="pickle"):
        caption_request(str(pickled_models["sd"]), base_dir=Path("/"), model=str(pickled_models["blip"]))
