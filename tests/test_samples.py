"""Sample images while training (issue 16): prompt files, PNG files A1111 reads, and sampling that never
changes what is trained. Tiny random SD1 model on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.errors import ConfigError
from lorad.events import Event, LogLine, SampleImage
from lorad.sampling.files import a1111_parameters, list_samples
from lorad.sampling.prompts import (
    ResolvedPrompt,
    SamplePrompts,
    SampleSettings,
    read_prompt_file,
    resolve_prompts,
    sample_prompts_from,
)
from lorad.training.loop import train
from tests.conftest import tiny_train_values

# A1111's infotext parsing (modules/infotext_utils.py parse_generation_parameters), as documented there:
# the last line holds `Key: value` pairs when it has at least three; lines before it are the prompt
# until one starts with "Negative prompt:"; quoted values are JSON strings; `Size: WxH` splits in two.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    prompt, negative, done = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    result["Prompt"], result["Negative prompt"] = prompt, negative
    for key, value in _RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = _RE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def settings(**overrides: object) -> SampleSettings:
    values: dict = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0, "sampler": "euler_a", "seed": 42}
    return SampleSettings(**(values | overrides))


# --- prompt files and config ---------------------------------------------------------------------


def test_a_kohya_prompt_file_gives_each_prompt_its_inline_options(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment, skipped\n"
        "\n"
        "a photo of [trigger], studio light --n blurry, lowres --w 128 --h 96 --d 1234 --s 12 --l 5.5\n"
        "[trigger] on a beach --ss dpm++_2m_karras --g 3.5\n"
    )
    prompts = read_prompt_file(path)
    resolved = resolve_prompts(SamplePrompts(prompts), settings(trigger_word="mystyle"))
    first, second = resolved
    assert (first.prompt, first.negative) == ("a photo of mystyle, studio light", "blurry, lowres")
    assert (first.width, first.height, first.seed, first.steps, first.cfg_scale) == (128, 96, 1234, 12, 5.5)
    assert first.sampler == "euler_a" and first.index == 0
    # Unset options take the run's defaults; the seed is fixed per prompt (seed + index) so steps compare.
    assert (second.prompt, second.width, second.seed, second.steps) == ("mystyle on a beach", 64, 43, 4)
    assert (second.sampler, second.guidance) == ("dpm++_2m_karras", 3.5)


def test_yaml_and_json_prompt_files_use_kohyas_keys(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("- a cat --w 128\n- prompt: a dog\n  negative_prompt: ugly\n  sample_steps: 7\n")
    (tmp_path / "p.json").write_text(json.dumps({"prompts": [{"prompt": "a fox", "scale": 3, "seed": 9}]}))
    cat, dog = read_prompt_file(tmp_path / "p.yaml")
    assert (cat.prompt, cat.width, dog.prompt, dog.negative, dog.steps) == ("a cat", 128, "a dog", "ugly", 7)
    (fox,) = read_prompt_file(tmp_path / "p.json")
    assert (fox.prompt, fox.cfg_scale, fox.seed) == ("a fox", 3.0, 9)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("a cat --w 100", "line 2, --w"),  # not a multiple of 8
        ("a cat --s many", "line 2, --s"),
        ("a cat --q 3", "line 2, --q"),
        ("a cat --ss warp_drive", "line 2, --ss"),
        ("--w 512", "line 2"),  # no prompt text
    ],
)
def test_a_bad_prompt_option_is_a_config_error_naming_the_line_and_the_option(
    tmp_path: Path, line: str, named: str
) -> None:
    (tmp_path / "prompts.txt").write_text(f"a fine prompt\n{line}\n")
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"train_data_dir": ".", "base_model": "m.safetensors", "output_dir": "o", "sample_prompts": "prompts.txt"},
            base_dir=tmp_path,
        )
    assert f"prompts.txt {named}" in str(err.value)


def test_a_sampling_schedule_without_prompts_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"train_data_dir": ".", "base_model": "m.safetensors", "output_dir": "o", "sample_every_n_steps": 10},
            base_dir=tmp_path,
        )
    assert "sample_every_n_steps" in str(err.value) and "sample_prompts" in str(err.value)


def test_sample_prompts_round_trip_through_the_config_dict(tmp_path: Path) -> None:
    prompts = sample_prompts_from(["a cat --w 128 --d 3", {"prompt": "a dog", "scale": 4}], tmp_path)
    again = sample_prompts_from(prompts.to_yaml(), tmp_path)
    assert again == prompts


def test_the_parameters_text_reads_back_as_a1111_parses_it() -> None:
    prompt = ResolvedPrompt(
        index=0,
        prompt="a cat, in a hat",
        negative="blurry, lowres",
        width=512,
        height=768,
        seed=1234,
        steps=20,
        cfg_scale=7.5,
        sampler="dpm++_2m_karras",
    )
    parsed = parse_a1111(a1111_parameters(prompt, lora_name="my_lora", model="v1-5: pruned", step=300))
    assert parsed["Prompt"] == "a cat, in a hat <lora:my_lora:1>"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"]) == (
        "20",
        "DPM++ 2M Karras",
        "7.5",
        "1234",
    )
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Model"] == "v1-5: pruned"  # a colon is quoted, as A1111 quotes it
    assert parsed["Training step"] == "300"


# --- training with samples -----------------------------------------------------------------------


def sample_values(tiny_sd: Path, dataset: Path, out: Path, **overrides: object) -> dict:
    values = {
        "max_train_steps": 4,
        "sample_prompts": ["a red circle --d 7", "[trigger] a blue square --n green --ss ddim --w 128 --h 64"],
        "trigger_word": "mystyle",
        "sample_steps": 3,
    }
    return tiny_train_values(tiny_sd, dataset, out, **(values | overrides))


def lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{out.name}.safetensors"))  # the kohya file


def run(values: dict, tmp_path: Path, **kwargs: object) -> list[Event]:
    events: list[Event] = []
    train(parse_config(values, base_dir=tmp_path), on_event=events.append, **kwargs)
    return events


@pytest.mark.slow
def test_samples_are_pngs_a1111_reads_and_the_lora_is_bit_identical_to_a_run_without(
    tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    run(tiny_train_values(tiny_sd, dataset, plain, max_train_steps=4, trigger_word="mystyle"), tmp_path)
    sampled = tmp_path / "sampled"
    events = run(sample_values(tiny_sd, dataset, sampled, sample_every_n_steps=2), tmp_path)

    reference, trained = lora_tensors(plain), lora_tensors(sampled)
    assert reference.keys() == trained.keys()
    assert all(torch.equal(reference[k], trained[k]) for k in reference)

    images = [e for e in events if isinstance(e, SampleImage)]
    assert [(e.step, e.prompt_index) for e in images] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    files = list_samples(sampled, "sampled")
    assert [(f.step, f.index, f.seed) for f in files] == [(2, 0, 7), (2, 1, 43), (4, 0, 7), (4, 1, 43)]
    second = images[1]
    assert Path(second.path).name == "sampled_00000002_01_43.png"
    with Image.open(second.path) as png:
        assert png.size == (128, 64) == (second.width, second.height)
        parsed = parse_a1111(png.info["parameters"])
    assert parsed["Prompt"] == "mystyle a blue square <lora:sampled:1>"
    assert (parsed["Negative prompt"], parsed["Sampler"]) == ("green", "DDIM")
    assert (parsed["Seed"], parsed["Steps"]) == ("43", "3")
    # The contact sheet: a row per prompt, a column per sampled step.
    sheet = Image.open(sampled / "samples" / "sampled_contact_sheet.png")
    assert sheet.size == (2 * 256, 2 * (256 + 16))


@pytest.mark.slow
def test_a_resumed_run_with_samples_ends_where_an_uninterrupted_one_does(
    tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    run(sample_values(tiny_sd, dataset, whole, sample_every_n_steps=1), tmp_path)
    halves = tmp_path / "halves"
    first = sample_values(tiny_sd, dataset, halves, sample_every_n_steps=1, max_train_steps=2, save_steps=1)
    run(first, tmp_path)
    run(sample_values(tiny_sd, dataset, halves, sample_every_n_steps=1, resume_from="latest"), tmp_path)
    a, b = lora_tensors(whole), lora_tensors(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The images of a step are the same whether or not the run was resumed in between.
    for step in (1, 3, 4):
        for index, seed in ((0, 7), (1, 43)):
            name = f"_{step:08d}_{index:02d}_{seed}.png"
            x, y = Image.open(whole / "samples" / f"whole{name}"), Image.open(halves / "samples" / f"halves{name}")
            assert x.tobytes() == y.tobytes()


@pytest.mark.slow
def test_sample_at_first_is_the_base_model_and_the_lora_changes_the_image(
    tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    # init_lora makes the adapter non-zero from the start: the baseline must still be the bare base model.
    first = tmp_path / "first"
    run(sample_values(tiny_sd, dataset, first, learning_rate="5e-2"), tmp_path)
    init = lora_tensors(first)
    assert any(v.abs().sum() > 0 for k, v in init.items() if "lora_up" in k)
    out = tmp_path / "again"
    values = sample_values(
        tiny_sd, dataset, out, sample_at_first=True, max_train_steps=1, learning_rate="5e-2",
        init_lora=str(first / "first.safetensors"),
    )  # fmt: skip
    events = run(values, tmp_path)
    baseline = [e for e in events if isinstance(e, SampleImage) and e.step == 0]
    trained = [e for e in events if isinstance(e, SampleImage) and e.step == 1]
    assert len(baseline) == len(trained) == 2
    assert "<lora:" not in parse_a1111(Image.open(baseline[0].path).info["parameters"])["Prompt"]

    # The base model alone (no adapter attached at all), drawn by the same renderer: the same pixels.
    from lorad.families.sd.family import load_for_training
    from lorad.families.sd.prompts import PromptEncoder
    from lorad.families.sd.sampling import SdSampler
    from lorad.training.placement import pick_placement

    config = parse_config(values, base_dir=tmp_path)
    placement = pick_placement("cpu", "no")
    components = load_for_training(str(tiny_sd), placement)
    encoder = PromptEncoder(components.tokenizer, components.text_encoder, placement.device, trainable=False)
    bare = SdSampler(config, components, encoder, placement, lambda event: None)
    for event in baseline:
        prompt = bare.prompts[event.prompt_index]
        image = bare.render(prompt, torch.Generator("cpu").manual_seed(prompt.seed), bare.embeddings)
        assert Image.open(event.path).tobytes() == image.tobytes()
    # With the LoRA (same prompt, same seed) the picture differs.
    for before, after in zip(baseline, trained, strict=True):
        assert Image.open(before.path).tobytes() != Image.open(after.path).tobytes()


@pytest.mark.slow
def test_a_sample_that_fails_is_a_warning_and_training_goes_on(
    tiny_sd: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorad.families.sd.sampling import SdSampler

    real = SdSampler.render

    def flaky(self, prompt, generator, embeddings):  # the second prompt runs out of memory, every round
        if prompt.index == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompt, generator, embeddings)

    monkeypatch.setattr(SdSampler, "render", flaky)
    out = tmp_path / "out"
    events = run(sample_values(tiny_sd, dataset, out, sample_every_n_steps=2), tmp_path)
    warnings = [e for e in events if isinstance(e, LogLine) and e.level == "warning" and "sample prompt 1" in e.message]
    assert len(warnings) == 2 and "a blue square" in warnings[0].message and "out of memory" in warnings[0].message
    assert [e.prompt_index for e in events if isinstance(e, SampleImage)] == [0, 0]
    assert lora_tensors(out)  # the run finished and exported


@pytest.mark.slow
def test_an_llm_answers_its_sample_prompts_during_training_without_changing_the_adapter(
    tiny_llm: Path, tmp_path: Path
) -> None:
    from lorad.config.llm_loader import parse_llm_config
    from lorad.events import SampleGenerated
    from tests.conftest import tiny_llm_values, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "count", "output": "one two three"}] * 8)
    prompts = {"sample_prompts": ["count"], "sample_max_new_tokens": 4, "max_train_steps": 4}

    def adapter(out: Path, **keys: object) -> tuple[dict[str, torch.Tensor], list[Event]]:
        events: list[Event] = []
        config = parse_llm_config(tiny_llm_values(tiny_llm, data, out, **prompts, **keys), base_dir=tmp_path)
        train(config, on_event=events.append)
        return load_file(str(out / "adapter" / "adapter_model.safetensors")), events

    plain, _ = adapter(tmp_path / "plain")
    sampled, events = adapter(tmp_path / "sampled", sample_every_n_steps=2, sample_at_first=True)
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)
    answers = [(e.step, e.prompt) for e in events if isinstance(e, SampleGenerated)]
    assert answers[:3] == [(0, "count"), (2, "count"), (4, "count")]  # then the end-of-run answer, step 4


@pytest.mark.slow
def test_schedule_free_samples_its_averaged_weights_and_trains_on_bit_identically(
    tiny_sd: Path, dataset: Path, tmp_path: Path
) -> None:
    keys = {"optimizer": "adamw_schedulefree", "learning_rate": "1e-2", "trigger_word": "mystyle"}
    plain = tmp_path / "plain"
    run(tiny_train_values(tiny_sd, dataset, plain, max_train_steps=4, **keys), tmp_path)
    sampled = tmp_path / "sampled"
    run(sample_values(tiny_sd, dataset, sampled, sample_every_n_steps=1, **keys), tmp_path)
    reference, trained = lora_tensors(plain), lora_tensors(sampled)
    assert all(torch.equal(reference[k], trained[k]) for k in reference)
