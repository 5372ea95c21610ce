"""Loading SDXL base models offline (lorad.models.sdxl_loader), on a tiny random SDXL built per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorad.config.dispatch import choose_family
from lorad.errors import ConfigError, ModelLoadError
from lorad.families.registry import detect_family
from lorad.models.ldm_layout import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, unet_to_ldm
from lorad.models.sdxl_components import SDXLComponents
from lorad.models.sdxl_loader import SDXL_CONFIGS, load_sdxl_components, probe_sdxl_checkpoint
from lorad.models.tiny import build_tiny_sd, write_original_checkpoint
from lorad.models.tiny_sdxl import (
    TINY_CONTEXT_DIM,
    TINY_POOLED_DIM,
    TINY_TE1_WIDTH,
    TINY_TE2_WIDTH,
    build_tiny_sdxl,
    write_sdxl_checkpoint,
)
from tests.support.hf_cache import put_in_hf_cache

pytestmark = pytest.mark.usefixtures("hf_cache")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL folder, its SGM single file, and a configs-only folder for that file."""
    root = tmp_path_factory.mktemp("tiny-sdxl")
    folder = build_tiny_sdxl(root / "sdxl")
    configs = root / "configs"
    for config in folder.rglob("*.json"):
        rel = config.relative_to(folder)
        if not rel.parts[0].startswith("tokenizer"):
            (configs / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(config, configs / rel)
    return {"folder": folder, "file": write_sdxl_checkpoint(folder, root / "sdxl.safetensors"), "configs": configs}


@pytest.fixture(scope="module")
def loaded(tiny: dict[str, Path]) -> SDXLComponents:
    return load_sdxl_components(str(tiny["folder"]))


def _assert_same_weights(a: SDXLComponents, b: SDXLComponents) -> None:
    for name in PARTS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        different = [k for k in left if not torch.equal(left[k], right[k])]
        assert not different, f"{name}: {different[:3]}"


def _with_extra_keys(source: Path, dest: Path, **extra: torch.Tensor) -> Path:
    save_file({**load_file(str(source)), **extra}, str(dest))
    return dest


# --- diffusers folders ----------------------------------------------------------------------------------


def test_tiny_folder_loads_as_sdxl(tiny: dict[str, Path], loaded: SDXLComponents) -> None:
    c = loaded
    assert (c.model_version, c.prediction_type, c.zero_terminal_snr) == ("sdxl", "epsilon", False)
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    assert c.source == str(tiny["folder"].resolve())
    for name in PARTS:
        module = getattr(c, name)
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert c.unet.config.addition_embed_type == "text_time"
    assert c.unet.config.cross_attention_dim == TINY_TE1_WIDTH + TINY_TE2_WIDTH == TINY_CONTEXT_DIM
    assert c.text_encoder_2.config.projection_dim == TINY_POOLED_DIM
    assert c.vae_scaling_factor == c.vae.config.scaling_factor == 0.13025
    # SDXL's pad convention: the first tokenizer pads with <|endoftext|>, the second with "!".
    ids = c.tokenizer(["a red cat"], padding="max_length", max_length=77).input_ids[0]
    ids_2 = c.tokenizer_2(["a red cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == len(ids_2) == 77
    assert ids[-1] == c.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids_2[-1] == c.tokenizer_2.convert_tokens_to_ids("!") != ids[-1]


def test_dtype_prediction_and_zero_terminal_snr_overrides(tiny: dict[str, Path]) -> None:
    c = load_sdxl_components(
        str(tiny["folder"]), dtype=torch.bfloat16, prediction_type="v_prediction", zero_terminal_snr=True
    )
    assert {p.dtype for name in PARTS for p in getattr(c, name).parameters()} == {torch.bfloat16}
    assert c.prediction_type == c.noise_scheduler.config.prediction_type == "v_prediction"
    # Zero terminal SNR: the last timestep keeps no signal at all (kohya's --zero_terminal_snr).
    assert c.zero_terminal_snr and c.noise_scheduler.alphas_cumprod[-1] == 0
    assert load_sdxl_components(str(tiny["folder"])).noise_scheduler.alphas_cumprod[-1] > 0
    with pytest.raises(ConfigError, match="prediction_type"):
        load_sdxl_components(str(tiny["folder"]), prediction_type="sample")


def test_v_prediction_folder_is_read_from_its_scheduler(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = build_tiny_sdxl(tmp_path / "vpred", prediction_type="v_prediction")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "rescale_betas_zero_snr": True}))
    c = load_sdxl_components(str(folder))
    assert (c.prediction_type, c.zero_terminal_snr) == ("v_prediction", True)


def test_refiner_folder_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny["configs"], tmp_path / "refiner")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], requires_aesthetics_score=True
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelLoadError, match="SDXL refiner") as err:
        load_sdxl_components(str(folder))
    assert "base model" in err.value.hint


def test_sd1_folder_is_not_sdxl(tmp_path: Path) -> None:
    sd1 = build_tiny_sd(tmp_path / "sd1")
    with pytest.raises(ModelLoadError, match="not an SDXL model"):
        load_sdxl_components(str(sd1))


# --- single files ---------------------------------------------------------------------------------------


def test_single_file_has_the_sgm_layout(tiny: dict[str, Path]) -> None:
    with safe_open(str(tiny["file"]), framework="pt") as fh:
        keys = set(fh.keys())
    assert UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert UNET_PREFIX + "middle_block.1.proj_in.weight" in keys
    assert UNET_PREFIX + "label_emb.0.0.weight" in keys
    assert SDXL_CLIP_PREFIX + "encoder.layers.1.self_attn.q_proj.weight" in keys
    assert SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight" in keys
    assert SDXL_OPEN_CLIP_PREFIX + "text_projection" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    assert not any(k.startswith(("down_blocks", "unet.", "cond_stage_model.")) for k in keys)


def test_single_file_round_trips_bit_identical(tiny: dict[str, Path], loaded: SDXLComponents) -> None:
    c = load_sdxl_components(str(tiny["file"]), model_config_dir=tiny["folder"])
    _assert_same_weights(c, loaded)
    assert (c.prediction_type, c.zero_terminal_snr) == ("epsilon", False)
    assert (c.tokenizer.pad_token, c.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


def test_v_pred_and_ztsnr_markers_are_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    marked = _with_extra_keys(
        tiny["file"], tmp_path / "noob-vpred.safetensors", v_pred=torch.tensor([]), ztsnr=torch.tensor([])
    )
    c = load_sdxl_components(str(marked), model_config_dir=tiny["folder"])
    assert (c.prediction_type, c.zero_terminal_snr) == ("v_prediction", True)
    c = load_sdxl_components(
        str(marked), model_config_dir=tiny["folder"], prediction_type="epsilon", zero_terminal_snr=False
    )
    assert (c.prediction_type, c.zero_terminal_snr) == ("epsilon", False)


def test_shipped_configs_that_do_not_fit_name_model_config_dir(tiny: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"shipped SDXL base 1\.0 configs") as err:
        load_sdxl_components(str(tiny["file"]))
    assert "`model_config_dir`" in err.value.hint and "text_encoder_2/" in err.value.hint


def test_single_file_without_tokenizer_names_tokenizer_path(tiny: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="no CLIP tokenizer found for this SDXL model") as err:
        load_sdxl_components(str(tiny["file"]), model_config_dir=tiny["configs"])
    assert "`tokenizer_path`" in err.value.hint


def test_tokenizer_from_hf_cache_gets_sdxl_pad_tokens(tiny: dict[str, Path], hf_cache: Path) -> None:
    # The cache holds one CLIP tokenizer (pad "!" here); SDXL's pad tokens are set per role.
    put_in_hf_cache(hf_cache, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", tiny["folder"] / "tokenizer_2")
    c = load_sdxl_components(str(tiny["file"]), model_config_dir=tiny["configs"])
    assert (c.tokenizer.pad_token, c.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert c.tokenizer("a red cat").input_ids == c.tokenizer_2("a red cat").input_ids


def test_tokenizer_path_serves_both_tokenizers(tiny: dict[str, Path]) -> None:
    c = load_sdxl_components(
        str(tiny["file"]), model_config_dir=tiny["configs"], tokenizer_path=tiny["folder"] / "tokenizer"
    )
    assert (c.tokenizer.pad_token, c.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


def test_refiner_edm_and_inpaint_files_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    refiner = tmp_path / "refiner.safetensors"
    save_file(
        {
            UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(4, 8),
            "conditioner.embedders.0.model.text_projection": torch.zeros(8, 8),
        },
        str(refiner),
    )
    with pytest.raises(ModelLoadError, match="SDXL refiner") as err:
        load_sdxl_components(str(refiner))
    assert "base model" in err.value.hint

    edm = _with_extra_keys(tiny["file"], tmp_path / "playground.safetensors", edm_mean=torch.zeros(4))
    with pytest.raises(ModelLoadError, match="EDM noise schedule"):
        load_sdxl_components(str(edm), model_config_dir=tiny["folder"])

    state = load_file(str(tiny["file"]))
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    state[conv_in] = torch.zeros(state[conv_in].shape[0], 9, 3, 3)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(ModelLoadError, match="9 input channels"):
        load_sdxl_components(str(tmp_path / "inpaint.safetensors"), model_config_dir=tiny["folder"])


def test_unet_only_export_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    state = {k: v for k, v in load_file(str(tiny["file"])).items() if not k.startswith(SDXL_CLIP_PREFIX)}
    save_file(state, str(tmp_path / "no-te1.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lacks the first .* text encoder"):
        load_sdxl_components(str(tmp_path / "no-te1.safetensors"), model_config_dir=tiny["folder"])


def test_sdxl_ckpt_needs_allow_pickle(tiny: dict[str, Path], loaded: SDXLComponents, tmp_path: Path) -> None:
    ckpt = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": load_file(str(tiny["file"]))}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle") as err:
        load_sdxl_components(str(ckpt), model_config_dir=tiny["folder"])
    assert "allow_pickle" in err.value.hint
    _assert_same_weights(load_sdxl_components(str(ckpt), model_config_dir=tiny["folder"], allow_pickle=True), loaded)


def test_shipped_configs_describe_real_sdxl_base() -> None:
    """A real-size SDXL UNet (built on the meta device: shapes only) written in the SGM layout is
    recognised, fits the shipped configs, and diffusers' converter maps every key back."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    sgm = unet_to_ldm(unet.state_dict(), config)
    assert UNET_PREFIX + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in sgm
    assert UNET_PREFIX + "output_blocks.2.2.conv.weight" in sgm
    shapes = {k: tuple(v.shape) for k, v in sgm.items()}
    te1, te2 = (json.loads((SDXL_CONFIGS / p / "config.json").read_text()) for p in ("text_encoder", "text_encoder_2"))
    shapes[SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight"] = (te1["vocab_size"], te1["hidden_size"])
    shapes[SDXL_OPEN_CLIP_PREFIX + "token_embedding.weight"] = (te2["vocab_size"], te2["hidden_size"])
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    info = probe_sdxl_checkpoint(shapes, "real")
    assert (info.context_dim, info.model_channels, info.added_cond_dim) == (2048, 320, 2816)
    converted = convert_ldm_unet_checkpoint(sgm, unet.config)
    assert converted.keys() == unet.state_dict().keys()


# --- resolving base_model and telling families apart ----------------------------------------------------


def test_cached_hub_id_loads(tiny: dict[str, Path], loaded: SDXLComponents, hf_cache: Path) -> None:
    snapshot = put_in_hf_cache(hf_cache, "lorad-test/tiny-sdxl", tiny["folder"])
    c = load_sdxl_components("lorad-test/tiny-sdxl")
    assert c.source == str(snapshot)
    _assert_same_weights(c, loaded)
    assert detect_family("lorad-test/tiny-sdxl").name == "sdxl"


def test_family_detection(tiny: dict[str, Path], tmp_path: Path) -> None:
    sd1 = build_tiny_sd(tmp_path / "sd1")
    sd1_file = write_original_checkpoint(sd1, tmp_path / "sd1.safetensors")
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    assert detect_family(str(tiny["folder"])).name == "sdxl"
    assert detect_family(str(tiny["file"])).name == "sdxl"
    # SD 1.x/2.x is the family of last resort, whose loader then says what is wrong with a file.
    for other in (sd1, sd1_file, garbage):
        assert detect_family(str(other)) is None
        assert choose_family({"base_model": str(other)}, base_dir=tmp_path).name == "sd"
