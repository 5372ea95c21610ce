"""The LLM engine on a tiny Llama (CPU): each shape trains, outputs reload exactly, resume, init_adapter."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorad.config.llm_loader import parse_llm_config
from lorad.errors import DataError, TrainingInterrupted
from lorad.events import EvalDone, Event, SampleGenerated, StepDone
from lorad.training.loop import TrainResult as LlmTrainResult
from lorad.training.loop import train as train_llm_lora
from tests.support.datasets import tiny_llm_values, write_jsonl

# A tiny memorisable set: four short answers the model can learn in a few dozen steps.
ANSWERS = {"colour one": "red green", "colour two": "blue yellow", "count": "one two three", "greet": "hello world"}


def train(tiny_llm: Path, data: Path, out: Path, **overrides: object) -> tuple[LlmTrainResult, list[Event]]:
    config = parse_llm_config(tiny_llm_values(tiny_llm, data, out, **overrides), base_dir=out.parent)
    events: list[Event] = []
    return train_llm_lora(config, on_event=events.append), events


def losses(events: list[Event]) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepDone)]


def write_shape(folder: Path, shape: str) -> Path:
    if shape == "alpaca":
        return write_jsonl(folder / "a.jsonl", [{"instruction": q, "output": a} for q, a in ANSWERS.items()])
    if shape == "chat":
        rows = [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ]
            }
            for q, a in ANSWERS.items()
        ]
        (folder / "c.json").write_text(json.dumps(rows))
        return folder / "c.json"
    if shape == "sharegpt":
        return write_jsonl(
            folder / "s.jsonl",
            [
                {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for q, a in ANSWERS.items()
            ],
        )
    (folder / "t.csv").write_text("text\n" + "".join(f"{q}: {a}\n" for q, a in ANSWERS.items()))
    return folder / "t.csv"


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["alpaca", "chat", "sharegpt", "text"])
def test_each_data_shape_trains_and_the_loss_goes_down(tiny_llm: Path, tmp_path: Path, shape: str) -> None:
    _, events = train(tiny_llm, write_shape(tmp_path, shape), tmp_path / "out", max_train_steps=25)
    seen = losses(events)
    assert len(seen) == 25
    assert sum(seen[-5:]) / 5 < sum(seen[:5]) / 5 - 0.05


@pytest.fixture(scope="module")
def trained(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlmTrainResult, list[Event]]:
    """One run on alpaca data with a merged export, an eval split and sample prompts."""
    folder = tmp_path_factory.mktemp("llm-run")
    data = write_shape(folder, "alpaca")
    result, events = train(
        tiny_llm,
        data,
        folder / "out",
        max_train_steps=60,
        merge_export=True,
        eval_fraction=0.25,
        eval_steps=30,
        sample_prompts=["colour one"],
    )
    return folder, result, events


def adapter_model(tiny_llm: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), str(adapter)).eval()


@pytest.mark.slow
def test_the_saved_adapter_reloads_to_the_end_of_training_logits(tiny_llm: Path, trained) -> None:
    from transformers import AutoModelForCausalLM

    from lorad.families.llm.model import LlmModel
    from lorad.training.family import ProvidedModel

    folder, result, _ = trained
    adapter = Path(result.outputs["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        reloaded = adapter_model(tiny_llm, adapter)(input_ids=ids).logits

    # The model at the end of training: a provider hands the engine a model the test keeps.
    base = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    captured = {}

    @contextmanager
    def provide(config, placement):
        yield ProvidedModel(model=LlmModel(model=base, source="test", model_version="llama"), resident=True, seconds=0)

    def on_event(event: Event) -> None:
        if isinstance(event, SampleGenerated):  # after the last step, adapter still attached
            with torch.no_grad():
                captured["logits"] = base(input_ids=ids).logits

    config = parse_llm_config(
        tiny_llm_values(
            tiny_llm,
            folder / "a.jsonl",
            folder / "again",
            max_train_steps=60,
            eval_fraction=0.25,
            eval_steps=30,
            sample_prompts=["colour one"],
        ),
        base_dir=folder,
    )
    before = {k: v.clone() for k, v in base.state_dict().items()}
    train_llm_lora(config, on_event=on_event, models=provide)
    torch.testing.assert_close(captured["logits"], reloaded, rtol=0, atol=1e-5)
    # The same run twice gives the same adapter (seeded), and the base is left bit-identical.
    again = load_file(str(folder / "again/adapter/adapter_model.safetensors"))
    first = load_file(str(adapter / "adapter_model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_merged_export_equals_base_plus_adapter(tiny_llm: Path, trained) -> None:
    from transformers import AutoModelForCausalLM

    _, result, _ = trained
    ids = torch.tensor([[1, 11, 22, 33, 44, 55, 2]])
    merged = AutoModelForCausalLM.from_pretrained(result.outputs["merged"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits,
            adapter_model(tiny_llm, Path(result.outputs["adapter"]))(input_ids=ids).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_no_pad_tokenizer_trains_and_the_model_learns_to_stop(tiny_llm: Path, trained) -> None:
    from transformers import AutoTokenizer

    _, result, events = trained
    assert AutoTokenizer.from_pretrained(tiny_llm).pad_token is None
    (sample,) = [e for e in events if isinstance(e, SampleGenerated)]
    assert sample.stopped == "eos" and sample.output == ANSWERS["colour one"]
    # The saved adapter folder carries the template and a pad token that is not EOS.
    saved = AutoTokenizer.from_pretrained(result.outputs["adapter"])
    assert saved.chat_template and saved.pad_token_id != saved.eos_token_id
    model = adapter_model(tiny_llm, Path(result.outputs["adapter"]))
    prompt = saved.apply_chat_template(
        [{"role": "user", "content": "colour one"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(input_ids=prompt, max_new_tokens=20, do_sample=False, pad_token_id=saved.pad_token_id)
    assert out[0, -1].item() == saved.eos_token_id and out.shape[1] < prompt.shape[1] + 20


def test_summary_reports_eval_samples_compatibility_and_logs(trained) -> None:
    folder, result, events = trained
    summary = json.loads(Path(result.outputs["summary"]).read_text())
    assert summary["model_family"] == "llm" and summary["steps"] == 60
    assert [e.step for e in events if isinstance(e, EvalDone)] == [30, 60]
    assert summary["eval_loss"] == pytest.approx([e for e in events if isinstance(e, EvalDone)][-1].loss)
    assert summary["data_report"]["eval_samples"] == 1 and summary["samples"][0]["stopped"] == "eos"
    assert summary["compatibility"]["vllm"] is True and summary["tokens_per_second"] > 0
    assert list((folder / "out" / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tiny_llm: Path, tmp_path: Path) -> None:
    data = write_shape(tmp_path, "chat")
    common = {"max_train_steps": 8, "lora_dropout": 0.2, "batch_size": 2, "save_steps": 4, "lr_scheduler": "cosine"}
    whole, _ = train(tiny_llm, data, tmp_path / "whole", **common)

    config = parse_llm_config(tiny_llm_values(tiny_llm, data, tmp_path / "split", **common), base_dir=tmp_path)
    stop = __import__("threading").Event()

    def stop_at_5(event: Event) -> None:
        if isinstance(event, StepDone) and event.step == 5:
            stop.set()

    with pytest.raises(TrainingInterrupted) as stopped:
        train_llm_lora(config, on_event=stop_at_5, stop=stop)
    assert stopped.value.checkpoint.endswith("step-000005")
    resumed, events = train(tiny_llm, data, tmp_path / "split", resume_from="latest", **common)
    assert [e.step for e in events if isinstance(e, StepDone)] == [6, 7, 8]
    a = load_file(str(Path(whole.outputs["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.outputs["adapter"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_init_adapter_starts_from_its_weights(tiny_llm: Path, trained, tmp_path: Path) -> None:
    folder, result, _ = trained
    start = load_file(str(Path(result.outputs["adapter"]) / "adapter_model.safetensors"))
    # A learning rate too small to move anything: the output is the adapter it started from.
    cont, cont_events = train(
        tiny_llm,
        folder / "a.jsonl",
        tmp_path / "cont",
        init_adapter=result.outputs["adapter"],
        max_train_steps=1,
        learning_rate="1e-12",
        lora_rank=2,
    )
    after = load_file(str(Path(cont.outputs["adapter"]) / "adapter_model.safetensors"))
    assert after.keys() == start.keys()
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)
    _, fresh_events = train(tiny_llm, folder / "a.jsonl", tmp_path / "fresh", max_train_steps=1)
    assert losses(cont_events)[0] < losses(fresh_events)[0] - 0.1


@pytest.mark.slow
def test_dora_and_rslora_train_reload_and_are_flagged(tiny_llm: Path, tmp_path: Path) -> None:
    result, _ = train(
        tiny_llm,
        write_shape(tmp_path, "alpaca"),
        tmp_path / "out",
        max_train_steps=3,
        use_dora=True,
        use_rslora=True,
        target_modules=["attention"],
        lora_rank=32,
    )
    summary = json.loads(Path(result.outputs["summary"]).read_text())
    warnings = " ".join(summary["compatibility"]["warnings"])
    assert "DoRA" in warnings and "rsLoRA" in warnings and "max_lora_rank" in warnings
    assert summary["compatibility"]["vllm"] is False
    saved = load_file(str(Path(result.outputs["adapter"]) / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in saved)
    adapter_model(tiny_llm, Path(result.outputs["adapter"]))  # peft loads it


def test_an_empty_data_file_fails_before_the_model_loads(tiny_llm: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    config = parse_llm_config(tiny_llm_values(tiny_llm, tmp_path / "empty.jsonl", tmp_path / "out"), base_dir=tmp_path)

    @contextmanager
    def must_not_load(config, placement):
        raise AssertionError("the model was requested before the data was checked")
        yield

    with pytest.raises(DataError, match=r"empty\.jsonl"):
        train_llm_lora(config, models=must_not_load)


@pytest.mark.slow
def test_packing_with_gradient_checkpointing_trains_and_leaves_the_base_as_found(
    tiny_llm: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from lorad.families.llm.model import LlmModel
    from lorad.training.family import ProvidedModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()

    @contextmanager
    def provide(config, placement):
        yield ProvidedModel(model=LlmModel(model=base, source="test", model_version="llama"), resident=True, seconds=0)

    config = parse_llm_config(
        tiny_llm_values(
            tiny_llm,
            write_shape(tmp_path, "sharegpt"),
            tmp_path / "out",
            packing=True,
            gradient_checkpointing=True,
            max_train_steps=15,
        ),
        base_dir=tmp_path,
    )
    events: list[Event] = []
    train_llm_lora(config, on_event=events.append, models=provide)
    seen = losses(events)
    assert seen[-1] < seen[0]
    assert not base.is_activation_checkpointing and base.config.use_cache and not base.training
    assert not any("lora" in name for name, _ in base.named_modules())


@pytest.mark.slow
def test_lorad_train_runs_an_llm_config_in_process(
    tiny_llm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorad.cli.local_training import run_training
    from tests.support.datasets import write_config

    values = tiny_llm_values(tiny_llm, write_shape(tmp_path, "alpaca"), tmp_path / "out", max_train_steps=3)
    config = write_config(tmp_path / "llm.yaml", **values)
    assert run_training(config, base_dir=tmp_path) == 0
    out = capsys.readouterr()
    assert "PEFT adapter:" in out.out and str(tmp_path / "out" / "adapter") in out.out
    assert "text data: 4 of 4 rows usable (alpaca: 4)" in out.err
