"""The standalone LoRA Training page in a real headless chromium (Playwright), served by gradio 3.41.2
under protobuf 3.20 (the A1111-like venv), against a real in-process daemon with the tiny model:
upload four images, caption them, train, see completion, inspect the LoRA, find it in the target folder.

The finished page is saved as test-artifacts/webui-standalone-finished.png (look at it after a change).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorad.models.tiny_captioners import build_tiny_wd14
from lorad.server.daemon import RunningDaemon
from lorad_webui.captions import read_captions
from tests.support.datasets import draw_image
from tests.support.webui_env import EXTENSION_DIR, REPO, a1111_python, load_script

ARTIFACTS = REPO / "test-artifacts"
# Generous: the page waits on real training; these only bound a hang.
TRAIN_TIMEOUT_MS = 180_000
STEP_TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def page_url(daemon: RunningDaemon, tmp_path: Path) -> Iterator[str]:
    """The standalone page, in the A1111-like venv, talking to ``daemon``; its LoRA folder is tmp_path/Lora."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "PYTHONPATH")}
    env["LORAD_HOME"] = str(daemon.settings.home)  # found like a WebUI on the same machine finds it
    process = subprocess.Popen(
        [
            str(a1111_python()),
            "-m",
            "lorad_webui.standalone",
            "--port",
            str(port),
            "--lora-dir",
            str(tmp_path / "Lora"),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=EXTENSION_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # the page prints its URL once the server answers
            lines.append(line)
            if line.startswith("lorad LoRA Training page: "):
                break
        else:
            pytest.fail("the standalone page exited:\n" + "".join(lines))
        yield line.split(": ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _field(page: object, elem_id: str) -> object:
    """The text input inside a gradio 3 Textbox/Number block."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first  # type: ignore[attr-defined]


@pytest.mark.slow
def test_upload_caption_train_and_find_the_lora(page_url: str, tiny_sd: Path, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = load_script("webui_test_envs").find_chromium()
    assert chromium, "no chromium: run `.venv/bin/python scripts/webui_test_envs.py --browser`"
    tagger = build_tiny_wd14(tmp_path / "wd14")
    picked = tmp_path / "picked"
    picked.mkdir()
    images = []
    for i, (colour, shape) in enumerate(
        (("red", "circle"), ("green", "square"), ("blue", "circle"), ("yellow", "square"))
    ):
        images.append(picked / f"{colour}_{shape}.png")
        draw_image(images[-1], colour, shape, seed=i)

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(STEP_TIMEOUT_MS)
        try:
            page.goto(page_url)
            playwright_api.expect(page.locator("#lorad-status").first).to_contain_text("Connected to lorad")

            # 1. Upload: the images land in a new folder, listed without captions.
            page.locator("#lorad-upload input[type=file]").set_input_files([str(p) for p in images])
            playwright_api.expect(_field(page, "lorad-caption-log")).to_have_value(
                "4 images, 4 without a caption; captions in .txt files beside the images."
            )
            folder = Path(_field(page, "lorad-folder").input_value())
            assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in images)

            # 2. Caption through the daemon with the tiny tagger; the table shows the new captions.
            page.locator("#lorad-captioner input").first.click()  # BLIP is the default: pick WD14
            page.locator("#lorad-captioner li", has_text="wd14 (tags)").first.click()
            _field(page, "lorad-captioner-model").fill(str(tagger))
            _field(page, "lorad-trigger").fill("ohwx")
            page.locator("#lorad-caption").click()
            playwright_api.expect(_field(page, "lorad-caption-log")).to_have_value(re.compile("done: 4 captioned"))
            playwright_api.expect(page.locator("#lorad-captions")).to_contain_text("ohwx, tiny hero")

            # Edit one caption in the table and save it back into the folder's metadata.csv.
            page.locator("#lorad-captions").get_by_text("red theme").first.dblclick()
            page.keyboard.press("Control+A")
            page.keyboard.type("ohwx, a red circle drawn by hand")
            page.keyboard.press("Enter")
            page.locator("#lorad-save-captions").click()
            playwright_api.expect(_field(page, "lorad-caption-log")).to_have_value("Saved 1 changed caption.")
            assert read_captions(folder)["red_circle.png"] == "ohwx, a red circle drawn by hand"

            # 3. Train on the tiny model: a few steps at 64 px on the CPU.
            _field(page, "lorad-base-path").fill(str(tiny_sd))
            _field(page, "lorad-name").fill("browser_lora")
            _field(page, "lorad-rank").fill("4")
            _field(page, "lorad-length").fill("2")
            page.get_by_text("More settings").click()
            _field(page, "lorad-resolution").fill("64")
            _field(page, "lorad-extra").fill(
                "min_bucket_reso: 64\nmax_bucket_reso: 128\nbucket_reso_steps: 16\nbatch_size: 2\ndevice: cpu"
            )
            page.locator("#lorad-train").click()
            playwright_api.expect(_field(page, "lorad-snippet")).to_have_value(
                "<lora:browser_lora:0.8>", timeout=TRAIN_TIMEOUT_MS
            )
            progress = _field(page, "lorad-progress").input_value()
            assert "succeeded" in progress.splitlines()[0] and "step 2/2 (100%)" in progress

            # 4. Inspect: with no file named, the job's LoRA, as the daemon reads it.
            page.locator("#lorad-inspect").click()
            report = _field(page, "lorad-inspect-report")
            playwright_api.expect(report).to_have_value(re.compile("base model: Stable Diffusion 1.x"))
            assert "browser_lora.safetensors" in report.input_value().splitlines()[0]
            assert "problems:   none" in report.input_value()
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui-standalone-finished.png"), full_page=True)
            browser.close()

    placed = tmp_path / "Lora" / "browser_lora.safetensors"
    assert placed.is_file() and [p.name for p in placed.parent.iterdir()] == ["browser_lora.safetensors"]
    trained = tmp_path / "work" / "runs" / "browser_lora" / "browser_lora.safetensors"
    assert placed.read_bytes() == trained.read_bytes()


@pytest.mark.slow
def test_the_gallery_fills_while_a_job_runs_and_the_buttons_ask_it(
    page_url: str, tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = load_script("webui_test_envs").find_chromium()
    assert chromium, "no chromium: run `.venv/bin/python scripts/webui_test_envs.py --browser`"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(STEP_TIMEOUT_MS)
        try:
            page.goto(page_url)
            playwright_api.expect(page.locator("#lorad-status").first).to_contain_text("Connected to lorad")
            _field(page, "lorad-folder").fill(str(dataset))
            _field(page, "lorad-base-path").fill(str(tiny_sd))
            _field(page, "lorad-name").fill("gallery_lora")
            _field(page, "lorad-rank").fill("4")
            _field(page, "lorad-length").fill("100000")  # runs until cancelled
            page.get_by_text("More settings").click()
            _field(page, "lorad-resolution").fill("64")
            _field(page, "lorad-sample-prompts").fill("a red circle --d 1\na blue square --d 2")
            _field(page, "lorad-sample-every").fill("3")
            _field(page, "lorad-extra").fill(
                "min_bucket_reso: 64\nmax_bucket_reso: 128\nbucket_reso_steps: 16\nbatch_size: 2\ndevice: cpu\n"
                "sample_steps: 2"
            )
            page.locator("#lorad-train").click()

            # The job runs until cancelled, so every image seen here arrived while it trained.
            gallery = page.locator("#lorad-samples img")
            playwright_api.expect(gallery.nth(1)).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
            assert "running" in _field(page, "lorad-progress").input_value().splitlines()[0]
            shown = gallery.count()
            playwright_api.expect(gallery.nth(shown + 1)).to_be_visible(timeout=TRAIN_TIMEOUT_MS)  # a later round

            page.locator("#lorad-sample-now").click()
            playwright_api.expect(page.locator("#lorad-status").first).to_contain_text("sample at step")
            page.locator("#lorad-save-now").click()
            playwright_api.expect(page.locator("#lorad-status").first).to_contain_text("checkpoint saved at step")
            page.locator("#lorad-cancel").click()
            playwright_api.expect(_field(page, "lorad-progress")).to_have_value(re.compile("cancelled"))
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui-standalone-samples.png"), full_page=True)
            browser.close()
    samples = sorted((tmp_path / "work" / "runs" / "gallery_lora" / "samples").glob("gallery_lora_*.png"))
    assert len(samples) >= 6  # two prompts, at least two scheduled rounds and the one asked for
