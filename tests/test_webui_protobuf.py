"""The extension's own stubs: current with the .proto files, and a real round trip with the daemon
from a process that has only the extension, under AUTOMATIC1111's protobuf 3.20.x and under the
current protobuf."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorad.models.tiny_captioners import build_tiny_wd14
from lorad.server.daemon import RunningDaemon
from lorad_webui.captions import read_captions
from tests.support.datasets import make_dataset, tiny_train_values
from tests.support.webui_env import EXTENSION_DIR, a1111_python, current_python, load_script, run_python


def test_the_extension_stubs_and_vendored_modules_are_not_stale() -> None:
    gen = load_script("gen_webui_api")
    expected = gen.render_files()
    assert gen.find_stale(expected) == [], "stale WebUI stubs: run `just proto`"
    assert {p.name for p in (EXTENSION_DIR / "lorad_webui" / "api" / "v1").glob("*_pb2.py")} == {
        f"{p.stem}_pb2.py" for p in (gen.PROTO_ROOT / "lorad" / "v1").glob("*.proto")
    }


def test_the_check_names_edited_and_extra_files(tmp_path: Path) -> None:
    gen = load_script("gen_webui_api")
    expected = gen.render_files()
    assert gen.write_files(expected, tmp_path) == sorted(expected)
    (tmp_path / "lorad_webui" / "api" / "v1" / "jobs_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "lorad_webui" / "vendored" / "gone.py").write_text("# from a deleted source\n")
    assert gen.find_stale(expected, tmp_path) == ["lorad_webui/api/v1/jobs_pb2.py", "lorad_webui/vendored/gone.py"]


ROUND_TRIP = """
import json, sys
from google.protobuf import __version__ as protobuf_version
from lorad_webui.api.v1 import caption_pb2, jobs_pb2
from lorad_webui.connection import Daemon, DaemonError
from lorad_webui.progress import JobProgress

images, tagger, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
report = {"protobuf": protobuf_version}
with Daemon.connect() as daemon:  # found through $LORAD_HOME's discovery file, like a WebUI on the same machine
    report["target"] = daemon.target.target
    report["version"] = daemon.version()
    captions = list(daemon.caption_images(images, captioner=caption_pb2.CAPTIONER_KIND_WD14, model=tagger,
                                          trigger_word="ohwx"))
    report["caption_items"] = [m.WhichOneof("item") for m in captions]
    report["captioned"] = captions[-1].finished.captioned
    try:
        daemon.submit_training({**fields, "lora_rank": -1}, base_dir=images, source_name="test")
    except DaemonError as err:
        report["refused"] = str(err)
    job = daemon.submit_training(fields, base_dir=images, source_name="test")
    tracker = JobProgress(job)
    for message in daemon.watch_job(job.job_id):
        tracker.apply(message)
    report["state"] = jobs_pb2.JobState.Name(tracker.state)
    report["outputs"] = sorted(tracker.outputs)
    report["text"] = tracker.text()
report["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lorad", "lorad_api", "lorad_client"))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("captioners") / "wd14")


@pytest.mark.slow
@pytest.mark.parametrize("venv", ["a1111 (protobuf 3.20)", "current protobuf"])
def test_a_round_trip_with_the_daemon(
    venv: str, daemon: RunningDaemon, tiny_sd: Path, tagger: Path, tmp_path: Path
) -> None:
    python = a1111_python() if venv.startswith("a1111") else current_python()
    images = make_dataset(tmp_path / "images", count=4, csv=False)
    for caption in images.glob("*.txt"):
        caption.unlink()
    fields = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in tiny_train_values(tiny_sd, images, tmp_path / "out", max_train_steps=1).items()
    }
    env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "PYTHONPATH")}
    env["LORAD_HOME"] = str(daemon.settings.home)
    result = run_python(python, ROUND_TRIP, str(images), str(tagger), json.dumps(fields), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["protobuf"].startswith("3.20.") == venv.startswith("a1111"), report["protobuf"]
    assert report["target"] == daemon.addresses[0] and report["version"]
    assert report["caption_items"][0] == "planned" and report["caption_items"][-1] == "finished"
    assert report["captioned"] == 4 and (images / "metadata.csv").is_file()  # where the daemon puts them
    assert all(caption.startswith("ohwx, ") for caption in read_captions(images).values())
    assert "`lora_rank`" in report["refused"]
    assert report["state"] == "JOB_STATE_SUCCEEDED" and "kohya" in report["outputs"], report["text"]
    assert report["heavy"] == []
