"""Loading SD 1.x/2.x base models offline (lorad.models), on tiny random models built per module."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

from tests.support.hf_cache import put_in_hf_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorad.errors import ConfigError, ModelLoadError
from lorad.models import sd_components
from lorad.models.sd_components import SDComponents
from lorad.models.sd_loader import load_sd_components
from lorad.models.tiny import (
    TINY_CONTEXT_DIM,
    TINY_IMAGE_SIZE,
    TINY_LATENT_SIZE,
    build_tiny_sd,
    write_original_checkpoint,
)

PROMPT = "a photo of a red cat"


class _NotATensor:
    """Pickled next to the weights to stand for the Python objects weights_only must refuse."""


SDXL_REFUSED = r"is an SDXL (model|checkpoint), which the SD 1\.x/2\.x loader does not load"

# Every test gets an empty Hugging Face cache, so a real cache on this machine cannot change results.
pytestmark = pytest.mark.usefixtures("hf_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny diffusers folders and their single-file twins: keys sd1, sd2, sd1_file, sd2_file."""
    root = tmp_path_factory.mktemp("tiny")
    out: dict[str, Path] = {}
    for version in ("sd1", "sd2"):
        folder = build_tiny_sd(root / version, version=version)
        out[version] = folder
        out[f"{version}_file"] = write_original_checkpoint(folder, root / f"{version}.safetensors")
    return out


@pytest.fixture(scope="module")
def loaded(tiny: dict[str, Path]) -> dict[str, SDComponents]:
    """The tiny folders loaded once per module (read-only reference for comparisons)."""
    return {version: load_sd_components(str(tiny[version])) for version in ("sd1", "sd2")}


def _configs_only(folder: Path, dest: Path, *, scheduler: bool = True) -> Path:
    """A model_config_dir: the folder's JSON configs, without weights or tokenizer."""
    for config in folder.rglob("*.json"):
        rel = config.relative_to(folder)
        if rel.parts[0] == "tokenizer" or (rel.parts[0] == "scheduler" and not scheduler):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, dest / rel)
    return dest


def _assert_same_weights(a: SDComponents, b: SDComponents) -> None:
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        different = [k for k in left if not torch.equal(left[k], right[k])]
        assert not different, f"{name}: {different[:3]}"


def _unet_output(components: SDComponents) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE, generator=generator)
    ids = components.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = components.text_encoder(ids)[0]
        return components.unet(sample, torch.tensor([10]), context).sample


# --- diffusers folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "prediction"), [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_tiny_folder_loads(
    tiny: dict[str, Path], loaded: dict[str, SDComponents], version: str, prediction: str
) -> None:
    c = loaded[version]
    assert (c.model_version, c.prediction_type) == (version, prediction)
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    assert c.noise_scheduler.config.prediction_type == prediction
    assert c.source == str(tiny[version].resolve())
    for module in (c.unet, c.vae, c.text_encoder):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size == TINY_CONTEXT_DIM
    assert c.vae_scale_factor == TINY_IMAGE_SIZE // TINY_LATENT_SIZE == 8
    with torch.no_grad():
        latents = c.vae.encode(torch.zeros(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).latent_dist.mean
    assert latents.shape == (1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
    names = {n.rsplit(".", 1)[0].split(".")[-1] for n, _ in c.unet.named_parameters()}
    assert {"to_q", "to_k", "to_v", "proj_in", "proj_out"} <= names


def test_relative_path_resolves_against_base_dir(tiny: dict[str, Path]) -> None:
    c = load_sd_components("sd1", base_dir=tiny["sd1"].parent)
    assert c.source == str(tiny["sd1"].resolve())


def test_dtype_and_prediction_override(tiny: dict[str, Path]) -> None:
    c = load_sd_components(str(tiny["sd1"]), dtype=torch.float16, prediction_type="v_prediction")
    assert c.prediction_type == c.noise_scheduler.config.prediction_type == "v_prediction"
    assert {p.dtype for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters()} == {torch.float16}
    with pytest.raises(ConfigError, match="prediction_type"):
        load_sd_components(str(tiny["sd1"]), prediction_type="sample")


def test_folder_with_pickle_weights_needs_allow_pickle(
    tiny: dict[str, Path], loaded: dict[str, SDComponents], tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny["sd1"], tmp_path / "bin-model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="pickle") as err:
        load_sd_components(str(folder))
    assert "`base_model`" in str(err.value) and "allow_pickle" in err.value.hint
    _assert_same_weights(load_sd_components(str(folder), allow_pickle=True), loaded["sd1"])


def test_sdxl_folder_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = _configs_only(tiny["sd1"], tmp_path / "xl")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLPipeline",
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=SDXL_REFUSED):
        load_sd_components(str(folder))


# --- single files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_single_file_round_trips_bit_identical(
    tiny: dict[str, Path], loaded: dict[str, SDComponents], version: str
) -> None:
    with safe_open(str(tiny[f"{version}_file"]), framework="pt") as handle:
        keys = list(handle.keys())
    text = "cond_stage_model.transformer.text_model." if version == "sd1" else "cond_stage_model.model."
    prefixes = ("model.diffusion_model.", "first_stage_model.", text)
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)

    folder = loaded[version]
    single = load_sd_components(str(tiny[f"{version}_file"]), model_config_dir=tiny[version])
    assert (single.model_version, single.prediction_type) == (folder.model_version, folder.prediction_type)
    _assert_same_weights(folder, single)
    assert torch.equal(_unet_output(folder), _unet_output(single))
    assert folder.vae_identity() == single.vae_identity()


@pytest.mark.parametrize(
    ("version", "scheduler", "expected"),
    [("sd2", None, "v_prediction"), ("sd2", "epsilon", "epsilon")],
)
def test_single_file_auto_prediction(
    tiny: dict[str, Path], tmp_path: Path, version: str, scheduler: str | None, expected: str
) -> None:
    configs = _configs_only(tiny[version], tmp_path / "configs", scheduler=scheduler is not None)
    if scheduler is not None:
        path = configs / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": scheduler}))
    c = load_sd_components(
        str(tiny[f"{version}_file"]), model_config_dir=configs, tokenizer_path=tiny[version] / "tokenizer"
    )
    assert c.prediction_type == c.noise_scheduler.config.prediction_type == expected


def test_ckpt_needs_allow_pickle(tiny: dict[str, Path], loaded: dict[str, SDComponents], tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    # Lightning-style nesting, as in the original SD releases.
    torch.save({"state_dict": load_file(tiny["sd1_file"]), "global_step": 1}, ckpt)
    with pytest.raises(ModelLoadError) as err:
        load_sd_components(str(ckpt), model_config_dir=tiny["sd1"])
    assert "`base_model`" in str(err.value) and "pickle" in str(err.value)
    assert "allow_pickle: true" in err.value.hint and ".safetensors" in err.value.hint
    from_ckpt = load_sd_components(str(ckpt), model_config_dir=tiny["sd1"], allow_pickle=True)
    _assert_same_weights(from_ckpt, loaded["sd1"])


def test_pickle_with_python_objects_is_refused_even_when_allowed(tiny: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny["sd1_file"]), "callback": _NotATensor()}, ckpt)
    with pytest.raises(ModelLoadError, match="Python objects"):
        load_sd_components(str(ckpt), model_config_dir=tiny["sd1"], allow_pickle=True)


def test_single_file_without_tokenizer_names_tokenizer_path(tiny: dict[str, Path], tmp_path: Path) -> None:
    configs = _configs_only(tiny["sd1"], tmp_path / "configs")
    with pytest.raises(ModelLoadError, match="no CLIP tokenizer") as err:
        load_sd_components(str(tiny["sd1_file"]), model_config_dir=configs)
    assert "`base_model`" in str(err.value)
    assert "`tokenizer_path`" in err.value.hint and "`model_config_dir`" in err.value.hint
    c = load_sd_components(str(tiny["sd1_file"]), model_config_dir=configs, tokenizer_path=tiny["sd1"] / "tokenizer")
    assert c.tokenizer.model_max_length == 77


def test_tokenizer_path_without_tokenizer_is_named(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="`tokenizer_path`"):
        load_sd_components(str(tiny["sd1"]), tokenizer_path=tmp_path)


def test_tokenizer_found_in_hf_cache(tiny: dict[str, Path], tmp_path: Path, hf_cache: Path) -> None:
    configs = _configs_only(tiny["sd1"], tmp_path / "configs")
    put_in_hf_cache(hf_cache, "openai/clip-vit-large-patch14", tiny["sd1"] / "tokenizer")
    c = load_sd_components(str(tiny["sd1_file"]), model_config_dir=configs)
    assert len(c.tokenizer(PROMPT).input_ids) == 8


def test_shipped_configs_that_do_not_fit_name_model_config_dir(tiny: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"shipped SD 1\.5 configs") as err:
        load_sd_components(str(tiny["sd1_file"]))
    assert "`model_config_dir`" in err.value.hint


def test_model_config_dir_must_be_a_config_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="`model_config_dir`"):
        load_sd_components(str(tiny["sd1_file"]), model_config_dir=tmp_path / "nowhere")


def test_non_sd_files_are_refused_clearly(tmp_path: Path) -> None:
    random_file = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, str(random_file))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint") as err:
        load_sd_components(str(random_file))
    assert "`base_model`" in str(err.value) and err.value.hint

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelLoadError, match="looks like a LoRA"):
        load_sd_components(str(lora))

    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"not a readable \.safetensors"):
        load_sd_components(str(garbage))


def test_sdxl_single_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
    }
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match=SDXL_REFUSED):
        load_sd_components(str(path))


# --- resolving base_model -------------------------------------------------------------------------------


def test_missing_path_names_base_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_sd_components("models/missing.safetensors", base_dir=tmp_path)
    assert "`base_model`" in str(err.value) and str(tmp_path / "models" / "missing.safetensors") in str(err.value)
    assert str(tmp_path) in err.value.hint


def test_uncached_hub_id_is_refused_without_download() -> None:
    with pytest.raises(ModelLoadError, match="`base_model` 'lorad-test/not-cached'") as err:
        load_sd_components("lorad-test/not-cached")
    assert "hf download lorad-test/not-cached" in err.value.hint


def test_cached_hub_id_loads(tiny: dict[str, Path], hf_cache: Path) -> None:
    snapshot = put_in_hf_cache(hf_cache, "lorad-test/tiny-sd2", tiny["sd2"])
    c = load_sd_components("lorad-test/tiny-sd2")
    assert (c.source, c.model_version, c.prediction_type) == (str(snapshot), "sd2", "v_prediction")


# --- tiny models, tokenizer, identity -----------------------------------------------------------------------


def test_build_tiny_sd_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    again = build_tiny_sd(tmp_path / "again", version="sd1", seed=0)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's RNG must be left alone"
    files = sorted(p.relative_to(tiny["sd1"]) for p in tiny["sd1"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny["sd1"] / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build_tiny_sd(tmp_path / "other", version="sd1", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (again / unet).read_bytes()


@pytest.mark.parametrize(("version", "pad"), [("sd1", "<|endoftext|>"), ("sd2", "!")])
def test_tokenizer_round_trips_and_pads_to_77(loaded: dict[str, SDComponents], version: str, pad: str) -> None:
    tokenizer = loaded[version].tokenizer
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    assert tokenizer.model_max_length == len(ids) == 77
    tokens = tokenizer.convert_ids_to_tokens(ids[:8])
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "red</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert ids[8:] == [tokenizer.convert_tokens_to_ids(pad)] * 69
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    # Words outside the training corpus still encode (as smaller pieces), never as unknowns.
    assert tokenizer.unk_token_id not in tokenizer("zyxwv quokka").input_ids[1:-1]


def test_vae_identity_is_memoised_and_tracks_weights(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    c = load_sd_components(str(tiny["sd1"]))
    calls = []
    real = sd_components.state_dict_digest
    monkeypatch.setattr(sd_components, "state_dict_digest", lambda sd: calls.append(1) or real(sd))
    first = c.vae_identity()
    assert c.vae_identity() == first and len(calls) == 1
    assert len(first) == 64 and int(first, 16) >= 0
    # Same weights in another dtype, or one weight nudged: different latents, different identity.
    half = dataclasses.replace(c, vae=copy.deepcopy(c.vae).to(dtype=torch.float16))
    assert half.vae_identity() != first
    nudged = dataclasses.replace(c, vae=copy.deepcopy(c.vae))
    with torch.no_grad():
        nudged.vae.decoder.conv_out.bias[0] += 1e-3
    assert nudged.vae_identity() != first
    same = dataclasses.replace(c, vae=copy.deepcopy(c.vae))
    assert same.vae_identity() == first
