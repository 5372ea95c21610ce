"""FLUX.1 models: the tiny builders, the BFL <-> diffusers key map, and the offline loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from lorad.errors import ModelLoadError
from lorad.families.flux.key_map import (
    COMFY_CHECKPOINT_PREFIX,
    FluxShape,
    bfl_to_diffusers,
    diffusers_to_bfl,
    linear_modules,
)
from lorad.models.flux_loader import (
    load_clip_l,
    load_t5xxl,
    load_transformer,
    load_vae,
    open_tokenizers,
    resolve_flux_model,
)
from lorad.models.tiny_flux import FluxFiles, build_tiny_flux, write_flux_files
from lorad.models.tiny_t5_tokenizer import write_tiny_t5_tokenizer
from tests.support.hf_cache import put_in_hf_cache

PROMPT = "a photo of a red cat sitting on a wooden table"
REAL_FLUX = FluxShape(num_layers=19, num_single_layers=38, inner_dim=3072, guidance_embeds=True)


@pytest.fixture(scope="module")
def files(tiny_flux: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> FluxFiles:
    return write_flux_files(tiny_flux["dev"], tmp_path_factory.mktemp("flux-files"))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, different[:3]


# --- tiny models -----------------------------------------------------------------------------------------


def test_tiny_flux_is_deterministic(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_flux(tmp_path / "again", variant="dev")
    for part in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/tokenizer.json",
    ):
        assert (again / part).read_bytes() == (tiny_flux["dev"] / part).read_bytes(), part


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_tiny_flux_is_a_flux_pipeline(tiny_flux: dict[str, Path], variant: str) -> None:
    pipe = FluxPipeline.from_pretrained(str(tiny_flux[variant]), local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is (variant == "dev")
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.1159)
    images = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_tiny_t5_tokenizer_behaves_like_t5(tmp_path: Path) -> None:
    from transformers import T5TokenizerFast

    size = write_tiny_t5_tokenizer(tmp_path / "a")
    write_tiny_t5_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tokenizer = T5TokenizerFast.from_pretrained(str(tmp_path / "a"))
    assert len(tokenizer) == size
    ids = tokenizer(PROMPT, padding="max_length", max_length=40).input_ids
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert ids[ids.index(1) + 1 :] == [0] * (40 - ids.index(1) - 1)  # </s> then padding
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert tokenizer.convert_ids_to_tokens(ids)[0].startswith("▁")  # SentencePiece's word marker


# --- key map ---------------------------------------------------------------------------------------------


def _row_fingerprint_bfl(shape: FluxShape) -> dict[str, torch.Tensor]:
    """A BFL state dict with FLUX.1's real row counts but one column: row r of key k holds (k's number, r).

    Converters only move rows, so this checks a key map on the full-size model in a few MB.
    """
    rows = {"img_in": 3072, "txt_in": 3072, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 6144}
    state: dict[str, torch.Tensor] = {}
    for number, module in enumerate(linear_modules(shape)):
        if module.bfl.endswith((".qkv",)):
            n = 3 * shape.inner_dim
        elif module.bfl.endswith("linear1"):
            n = 3 * shape.inner_dim + shape.mlp_hidden_dim
        elif module.bfl.endswith(("_mod.lin",)):
            n = 6 * shape.inner_dim
        elif module.bfl.endswith("modulation.lin"):
            n = 3 * shape.inner_dim
        elif module.bfl.endswith(("mlp.0",)):
            n = shape.mlp_hidden_dim
        else:
            n = rows.get(module.bfl, shape.inner_dim)
        column = torch.stack([torch.full((n,), float(number)), torch.arange(n, dtype=torch.float32)], dim=1)
        state[module.bfl + ".weight"] = column
        state[module.bfl + ".bias"] = column[:, 1] + 0.5
    for i in range(shape.num_layers):
        for stream in ("img", "txt"):
            for which in ("query", "key"):
                state[f"double_blocks.{i}.{stream}_attn.norm.{which}_norm.scale"] = torch.arange(128.0) + i
    for i in range(shape.num_single_layers):
        for which in ("query", "key"):
            state[f"single_blocks.{i}.norm.{which}_norm.scale"] = torch.arange(128.0) - i
    return state


def test_key_map_matches_diffusers_converter_on_real_flux_shapes() -> None:
    state = _row_fingerprint_bfl(REAL_FLUX)
    ours = bfl_to_diffusers(state, REAL_FLUX)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    assert ours.keys() == model.state_dict().keys()
    assert diffusers_to_bfl(ours, REAL_FLUX).keys() == state.keys()
    back = diffusers_to_bfl(ours, REAL_FLUX)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_diffusers_to_bfl_refuses_unknown_keys(tiny_flux: dict[str, Path]) -> None:
    state = load_file(str(tiny_flux["dev"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    shape = FluxShape.from_config(json.loads((tiny_flux["dev"] / "transformer" / "config.json").read_text()))
    with pytest.raises(ValueError, match="controlnet"):
        diffusers_to_bfl({**state, "controlnet.weight": torch.zeros(1)}, shape)


# --- loading ---------------------------------------------------------------------------------------------


def _components(sources, dtype=torch.float32):
    return (
        load_transformer(sources, dtype),
        load_vae(sources, dtype),
        load_clip_l(sources, dtype),
        load_t5xxl(sources, dtype),
    )


@pytest.mark.parametrize("comfy_prefix", [False, True])
def test_single_file_plus_separate_files_load_bit_identical(
    tiny_flux: dict[str, Path], tmp_path: Path, comfy_prefix: bool
) -> None:
    f = write_flux_files(tiny_flux["dev"], tmp_path, comfy_prefix=comfy_prefix)
    sources = resolve_flux_model(
        str(f.transformer), clip_l=f.clip_l, t5xxl=f.t5xxl, ae=f.ae, model_config_dir=tiny_flux["dev"]
    )
    folder = resolve_flux_model(str(tiny_flux["dev"]))
    assert (sources.variant, sources.t5_max_length) == ("dev", 512)
    for ours, reference in zip(_components(sources), _components(folder), strict=True):
        _same_state(ours, reference)
        assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    clip_tokenizer, t5_tokenizer = open_tokenizers(sources)
    assert t5_tokenizer.model_max_length == 512 and clip_tokenizer.model_max_length == 77


def test_float8_checkpoint_loads_directly(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    f = write_flux_files(tiny_flux["dev"], tmp_path, comfy_prefix=True, float8=True)
    stored = load_file(str(f.transformer))
    assert stored[COMFY_CHECKPOINT_PREFIX + "double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    sources = resolve_flux_model(
        str(f.transformer), clip_l=f.clip_l, t5xxl=f.t5xxl, ae=f.ae, model_config_dir=tiny_flux["dev"]
    )
    model = load_transformer(sources, torch.bfloat16)
    reference = FluxTransformer2DModel.from_pretrained(str(tiny_flux["dev"] / "transformer"))
    ours, theirs = model.state_dict(), reference.state_dict()
    qkv = "transformer_blocks.0.attn.to_q.weight"
    assert ours[qkv].dtype == torch.bfloat16
    # The float8 values, upcast: exactly what float8 storage kept of the original weights.
    assert torch.equal(ours[qkv].float(), theirs[qkv].to(torch.float8_e4m3fn).float())


def test_scaled_fp8_checkpoint_is_dequantized(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    f = write_flux_files(tiny_flux["dev"], tmp_path)
    state = load_file(str(f.transformer))
    key = "double_blocks.0.img_attn.qkv.weight"
    scale = state[key].abs().max() / 448.0
    state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
    state[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(state, str(f.transformer))
    sources = resolve_flux_model(
        str(f.transformer), clip_l=f.clip_l, t5xxl=f.t5xxl, ae=f.ae, model_config_dir=tiny_flux["dev"]
    )
    model = load_transformer(sources, torch.float32)
    original = load_file(str(tiny_flux["dev"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    q = model.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    assert torch.allclose(q, original["transformer_blocks.0.attn.to_q.weight"], rtol=0.07, atol=1e-3)


def test_bundled_checkpoint_needs_no_separate_files(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    f = write_flux_files(tiny_flux["dev"], tmp_path, comfy_prefix=True)
    bundle = {
        **load_file(str(f.transformer)),
        **{"vae." + k: v for k, v in load_file(str(f.ae)).items()},
        **{"text_encoders.clip_l.transformer." + k: v for k, v in load_file(str(f.clip_l)).items()},
        **{"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(str(f.t5xxl)).items()},
    }
    save_file(bundle, str(tmp_path / "bundle.safetensors"))
    sources = resolve_flux_model(str(tmp_path / "bundle.safetensors"), model_config_dir=tiny_flux["dev"])
    for ours, reference in zip(
        _components(sources), _components(resolve_flux_model(str(tiny_flux["dev"]))), strict=True
    ):
        _same_state(ours, reference)


def test_schnell_is_detected_by_its_missing_guidance_embedder(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    f = write_flux_files(tiny_flux["schnell"], tmp_path)
    sources = resolve_flux_model(
        str(f.transformer), clip_l=f.clip_l, t5xxl=f.t5xxl, ae=f.ae, model_config_dir=tiny_flux["schnell"]
    )
    assert (sources.variant, sources.t5_max_length) == ("schnell", 256)
    assert sources.scheduler_config["use_dynamic_shifting"] is False
    assert load_transformer(sources, torch.float32).config.guidance_embeds is False
    assert resolve_flux_model(str(tiny_flux["schnell"]), t5xxl_max_token_length=128).t5_max_length == 128


def test_compact_model_takes_its_depth_from_the_file(tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    f = write_flux_files(tiny_flux["dev"], tmp_path)
    state = {k: v for k, v in load_file(str(f.transformer)).items() if not k.startswith("single_blocks.1.")}
    save_file(state, str(f.transformer))
    sources = resolve_flux_model(
        str(f.transformer), clip_l=f.clip_l, t5xxl=f.t5xxl, ae=f.ae, model_config_dir=tiny_flux["dev"]
    )
    assert load_transformer(sources, torch.float32).config.num_single_layers == 1


def test_cached_hub_id_loads_offline(tiny_flux: dict[str, Path], hf_cache: Path) -> None:
    put_in_hf_cache(hf_cache, "someone/tiny-flux", tiny_flux["dev"])
    sources = resolve_flux_model("someone/tiny-flux")
    _same_state(
        load_transformer(sources, torch.float32),
        load_transformer(resolve_flux_model(str(tiny_flux["dev"])), torch.float32),
    )


# --- clear errors ----------------------------------------------------------------------------------------


def test_single_file_without_ae_names_the_key(files: FluxFiles, tiny_flux: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="`ae` is not set") as err:
        resolve_flux_model(
            str(files.transformer), clip_l=files.clip_l, t5xxl=files.t5xxl, model_config_dir=tiny_flux["dev"]
        )
    assert "ae.safetensors" in err.value.hint


def test_tiny_file_against_shipped_configs_names_model_config_dir(files: FluxFiles) -> None:
    with pytest.raises(ModelLoadError, match=r"does not match the shipped FLUX\.1 configs") as err:
        resolve_flux_model(str(files.transformer), clip_l=files.clip_l, t5xxl=files.t5xxl, ae=files.ae)
    assert "`model_config_dir`" in err.value.hint


def test_wrong_files_for_each_key_are_named(files: FluxFiles, tiny_flux: dict[str, Path], tmp_path: Path) -> None:
    from lorad.models.tiny import build_tiny_sd, write_original_checkpoint

    sd = write_original_checkpoint(build_tiny_sd(tmp_path / "sd"), tmp_path / "sd.safetensors")
    common = {"clip_l": files.clip_l, "t5xxl": files.t5xxl, "ae": files.ae, "model_config_dir": tiny_flux["dev"]}
    with pytest.raises(ModelLoadError, match="Stable Diffusion"):
        resolve_flux_model(str(sd), **common)
    sd_vae = {
        k.removeprefix("first_stage_model."): v
        for k, v in load_file(str(sd)).items()
        if k.startswith("first_stage_model.")
    }
    save_file(sd_vae, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(ModelLoadError, match=r"`ae` .*4-channel latents"):
        resolve_flux_model(str(files.transformer), **{**common, "ae": tmp_path / "sd_vae.safetensors"})
    with pytest.raises(ModelLoadError, match=r"`clip_l` .*not a CLIP text encoder"):
        resolve_flux_model(str(files.transformer), **{**common, "clip_l": files.t5xxl})
    with pytest.raises(ModelLoadError, match=r"`t5xxl` .* does not exist"):
        resolve_flux_model(str(files.transformer), **{**common, "t5xxl": tmp_path / "nope.safetensors"})
    (tmp_path / "model.ckpt").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match=r"\.safetensors only"):
        resolve_flux_model(str(tmp_path / "model.ckpt"), **common)


def test_missing_tokenizers_name_their_keys(
    files: FluxFiles,
    tiny_flux: dict[str, Path],
    tmp_path: Path,
    hf_cache: Path,
) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(tiny_flux["dev"], configs, ignore=shutil.ignore_patterns("tokenizer_2"))
    common = {"clip_l": files.clip_l, "t5xxl": files.t5xxl, "ae": files.ae, "model_config_dir": configs}
    with pytest.raises(ModelLoadError, match="no T5 tokenizer found") as err:
        resolve_flux_model(str(files.transformer), **common)
    assert "`t5xxl_tokenizer`" in err.value.hint
    with pytest.raises(ModelLoadError, match="`t5xxl_tokenizer`"):
        resolve_flux_model(str(files.transformer), **common, t5xxl_tokenizer=tmp_path)
    sources = resolve_flux_model(str(files.transformer), **common, t5xxl_tokenizer=tiny_flux["dev"] / "tokenizer_2")
    assert sources.t5_tokenizer == tiny_flux["dev"] / "tokenizer_2"
    # Or from the Hugging Face cache, where FLUX.1-dev's tokenizer_2/ would be.
    put_in_hf_cache(hf_cache, "black-forest-labs/FLUX.1-dev", tiny_flux["dev"] / "tokenizer_2", "tokenizer_2")
    cached = resolve_flux_model(str(files.transformer), **common)
    assert cached.t5_tokenizer.parts[-1] == "tokenizer_2" and str(hf_cache) in str(cached.t5_tokenizer)
    open_tokenizers(cached)
