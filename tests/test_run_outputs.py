"""What a run leaves for the user besides the final LoRA: a partial LoRA when it is stopped, kohya's
per-epoch LoRAs, names checked at submit, and files other users and tools can read."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.errors import ConfigError, TrainingInterrupted
from lorad.events import StepDone
from lorad.training.loop import train as train_sd_lora
from tests.support.datasets import tiny_train_values


def config_for(tmp_path: Path, tiny_sd: Path, dataset: Path, out: str = "out", **overrides: object):
    return parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / out, **overrides), base_dir=tmp_path)


def loads_in_diffusers(tiny_sd: Path, lora: Path) -> int:
    """How many UNet layers diffusers' own loader adapts from ``lora`` (a kohya file)."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora), adapter_name="check")
    return sum(1 for _, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer) and "check" in m.lora_A)


@pytest.mark.slow
def test_a_stopped_run_leaves_a_partial_lora_of_its_last_step(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted) as err:
        train_sd_lora(
            config_for(tmp_path, tiny_sd, dataset, epochs=3, save_precision="fp32"),
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 3 else None,
            stop=stop,
        )
    partial = Path(err.value.partial or "")
    assert partial == tmp_path / "out" / "out-partial-step00000003.safetensors"
    assert loads_in_diffusers(tiny_sd, partial) > 0
    with safe_open(str(partial), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "3"
    # It is exactly the LoRA of step 3: resuming that checkpoint with nothing left to train writes the same.
    same = train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, epochs=3, save_precision="fp32", max_train_steps=3, resume_from="latest")
    )
    ta, tb = load_file(str(partial)), load_file(same.outputs["kohya"])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_save_every_n_epochs_writes_kohya_epoch_loras(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    result = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, epochs=3, save_every_n_epochs=1))
    out = tmp_path / "out"
    epoch_files = sorted(p.name for p in out.glob("out-*.safetensors"))
    assert epoch_files == ["out-000001.safetensors", "out-000002.safetensors"]  # epoch 3 is out.safetensors
    for number, name in enumerate(epoch_files, start=1):
        with safe_open(str(out / name), "pt") as fh:
            assert fh.metadata()["ss_epoch"] == str(number)
        assert loads_in_diffusers(tiny_sd, out / name) > 0
    # Each is its own epoch's LoRA, not a copy of the final one.
    first, final = load_file(str(out / epoch_files[0])), load_file(result.outputs["kohya"])
    assert any(not torch.equal(first[k], final[k]) for k in first if k.endswith("lora_up.weight"))


@pytest.mark.parametrize(
    "name", ["my\x00lora", "tab\there", "x" * 230, "a/b", ".hidden"], ids=["nul", "control", "long", "slash", "dot"]
)
def test_an_output_name_no_file_system_takes_is_refused_at_submit(
    tmp_path: Path, tiny_sd: Path, dataset: Path, name: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config_for(tmp_path, tiny_sd, dataset, output_name=name)
    assert [p.key for p in err.value.problems] == ["output_name"]


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_outputs_honour_the_umask(tmp_path: Path, tiny_sd: Path, dataset: Path, umask_027: None) -> None:
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted):
        train_sd_lora(
            config_for(tmp_path, tiny_sd, dataset, "stopped", epochs=2),
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 2 else None,
            stop=stop,
        )
    checkpoint = tmp_path / "stopped" / "checkpoints" / "step-000002"
    assert mode(checkpoint) == 0o750 and mode(checkpoint / "state.pt") == 0o640
    assert mode(tmp_path / "stopped" / "stopped-partial-step00000002.safetensors") == 0o640

    result = train_sd_lora(config_for(tmp_path, tiny_sd, dataset))
    for role in ("kohya", "diffusers", "summary"):
        assert mode(Path(result.outputs[role])) == 0o640, role


def test_a_published_watch_lora_honours_the_umask(tmp_path: Path, umask_027: None) -> None:
    from lorad.watching.manager import publish
    from lorad.watching.records import WatchRecord, watch_policy

    lora = tmp_path / "out" / "style_v1.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"lora")
    (tmp_path / "style.yaml").write_text("output_name: style\n")
    record = WatchRecord(
        watch_id="w",
        folder=str(tmp_path / "incoming"),
        config_path=str(tmp_path / "style.yaml"),
        base_dir=str(tmp_path),
        policy=watch_policy(publish_dir=str(tmp_path / "Lora")),
        created_at=0.0,
        updated_at=0.0,
    )
    published = Path(publish(str(lora), record))
    assert published == tmp_path / "Lora" / "style.safetensors" and mode(published) == 0o640


@pytest.mark.slow
def test_a_stopped_llm_run_leaves_a_partial_adapter_peft_loads(tmp_path: Path, tiny_llm: Path, umask_027: None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorad.config.llm_loader import parse_llm_config
    from lorad.training.loop import train as train_llm_lora
    from tests.support.datasets import tiny_llm_values, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    config = parse_llm_config(tiny_llm_values(tiny_llm, data, tmp_path / "llm"), base_dir=tmp_path)
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted) as err:
        train_llm_lora(
            config, on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 3 else None, stop=stop
        )
    partial = Path(err.value.partial or "")
    assert partial == tmp_path / "llm" / "adapter-partial-step00000003"
    assert mode(partial / "adapter_model.safetensors") == 0o640 and mode(partial) == 0o750
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), str(partial))
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_a_job_cancelled_in_the_daemon_names_its_partial_lora(
    client: object, tmp_path: Path, tiny_sd: Path, dataset: Path
) -> None:
    import time

    import yaml

    values = tiny_train_values(tiny_sd, dataset, tmp_path / "long", max_train_steps=100_000)
    job = client.submit_training(  # type: ignore[attr-defined]
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}), base_dir=tmp_path
    )
    while client.get_job(job.job_id).progress.step < 2:  # type: ignore[attr-defined]
        time.sleep(0.05)
    client.cancel_job(job.job_id)  # type: ignore[attr-defined]
    events = [m.event for m in client.watch_job(job.job_id) if m.WhichOneof("item") == "event"]  # type: ignore[attr-defined]
    cancelled = events[-1].cancelled
    assert events[-1].WhichOneof("kind") == "cancelled"
    partial = Path(cancelled.partial)
    assert partial.is_file() and partial.name.startswith("long-partial-step") and Path(cancelled.checkpoint).is_dir()
