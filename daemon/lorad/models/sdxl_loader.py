"""Load an SDXL base model into :class:`SDXLComponents`, strictly offline.

``base_model`` may be an SGM / AUTOMATIC1111 single file (recognised by its
``conditioner.embedders.1.model.*`` keys: SDXL base, Pony, Illustrious, NoobAI and other
fine-tunes), a diffusers folder, or a Hugging Face id already in the local cache. Nothing is ever
downloaded: a single file is converted by diffusers' own single-file code fed the SDXL base
configs shipped in ``sd_configs/sdxl`` (or ``model_config_dir``), and the tokenizers come from
the same places as for SD 1.x (``tokenizer_path``, the model's or ``model_config_dir``'s
``tokenizer/``, the local Hugging Face cache).

The refiner, inpainting UNets and EDM-schedule models (Playground v2.5, CosXL) are refused with a
message saying why. As in :mod:`lorad.models.sd_loader`, every cheap check runs before any weights
are read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from lorad.errors import ModelLoadError
from lorad.models.ldm_layout import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from lorad.models.sd_folder import STEMS, FolderInfo, load_component, read_json_object, weights_options
from lorad.models.sd_loader import (
    SHIPPED_CONFIGS,
    check_model_config_dir,
    check_prediction_type,
    freeze,
    resolve_base_model,
    resolve_optional_path,
    resolve_prediction_type,
)
from lorad.models.sd_tokenizer import find_tokenizer_dir, has_tokenizer_files, open_tokenizer
from lorad.models.sdxl_components import SDXL_VAE_SCALING_FACTOR, SDXLComponents
from lorad.models.sdxl_detection import is_sdxl_folder, is_sdxl_keys
from lorad.models.single_file import (
    PICKLE_HINT,
    check_unet_in_channels,
    convert_single_file,
    is_pickle_path,
    read_pickle_checkpoint,
    read_safetensors,
    read_safetensors_shapes,
)

log = logging.getLogger(__name__)

#: Diffusers-layout configs of SDXL base 1.0 (and its tokenizers' settings), used for single files.
SDXL_CONFIGS = SHIPPED_CONFIGS / "sdxl"
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_TEXT_ENCODERS = (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
# Marker tensors that v-prediction SDXL fine-tunes (NoobAI-XL v-pred and others) carry for ComfyUI,
# which reads them the same way.
V_PRED_MARKER = "v_pred"
ZERO_SNR_MARKER = "ztsnr"
SDXL_HINT = (
    "`base_model` must be an SDXL checkpoint in the single-file (AUTOMATIC1111/SGM) layout, a diffusers "
    "SDXL folder, or a Hugging Face model id already in the local cache."
)
_REFINER_HINT = (
    "lorad trains LoRAs on the SDXL base model and its fine-tunes (Pony, Illustrious, NoobAI, ...); "
    "the refiner only polishes base outputs. Point `base_model` at the base model."
)

_Modules = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection]


@dataclass(frozen=True)
class SDXLCheckpointInfo:
    """What the key names and shapes of an SDXL single file say about its architecture."""

    context_dim: int  # width of the UNet's cross-attention context (te1 + te2 widths)
    model_channels: int  # width of the UNet's first level
    added_cond_dim: int  # input width of the added-conditioning MLP (pooled + 6 time embeddings)
    text_width: int  # CLIP-L hidden size
    text_width_2: int  # OpenCLIP bigG hidden size
    v_pred: bool  # carries the ``v_pred`` marker
    zero_terminal_snr: bool  # carries the ``ztsnr`` marker


@dataclass
class _Plan:
    scheduler_config: dict[str, Any]
    default_prediction: str  # when the scheduler config names none
    default_zero_snr: bool  # when the config does not set zero_terminal_snr
    model_tokenizers: tuple[Path | None, Path | None]  # the model's own tokenizer/ and tokenizer_2/
    config_tokenizers: list[Path]  # further tokenizer/ folders to try (model_config_dir's)
    configs: Path  # a diffusers-layout folder whose configs describe the model
    load: Callable[[torch.dtype], _Modules]


def load_sdxl_components(
    base_model: str,
    *,
    base_dir: Path | None = None,
    allow_pickle: bool = False,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
    zero_terminal_snr: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDXLComponents:
    """Load the UNet, VAE, both text encoders and tokenizers, and a training DDPM scheduler of an SDXL model.

    - ``base_model``, ``base_dir``, ``allow_pickle``, ``model_config_dir`` and ``tokenizer_path``
      mean what they mean for :func:`lorad.models.sd_loader.load_sd_components`; a single file's
      configs default to the shipped SDXL base 1.0 ones. ``tokenizer_path`` is one CLIP tokenizer
      folder, used for both tokenizers (they share the vocabulary); their pad tokens are set to
      SDXL's (``<|endoftext|>`` and ``!``) unless they come from the model folder's own
      ``tokenizer/`` and ``tokenizer_2/``.
    - ``prediction_type``: "auto" takes it from the single file's ``v_pred`` marker (v-pred
      fine-tunes carry it for ComfyUI), else the scheduler config (folder, or
      ``model_config_dir``), else epsilon (SDXL base); "epsilon"/"v_prediction" override.
    - ``zero_terminal_snr`` (kohya's option): rescale the betas so the last timestep is pure noise,
      as v-prediction fine-tunes such as NoobAI were trained. None takes it from the model (the
      single file's ``ztsnr`` marker, else the scheduler config's ``rescale_betas_zero_snr``).

    Follows the contract in :class:`SDXLComponents`. Raises ModelLoadError (message names the
    config key and value, ``hint`` the fix) when the model cannot be found, recognised or loaded,
    and ConfigError for an unknown ``prediction_type``.
    """
    check_prediction_type(prediction_type)
    where = f"`base_model` {base_model!r}"
    source, plan = _plan(base_model, base_dir, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    prediction_type = resolve_prediction_type(prediction_type, plan.scheduler_config, plan.default_prediction, where)
    if zero_terminal_snr is None:
        zero_terminal_snr = bool(plan.scheduler_config.get("rescale_betas_zero_snr", plan.default_zero_snr))
    own_dir, own_dir_2 = plan.model_tokenizers
    vocab_dir, vocab_source = find_tokenizer_dir(
        "sdxl",
        where,
        tokenizer_path=resolve_optional_path(tokenizer_path, base_dir),
        local_dirs=[*([own_dir] if own_dir else []), *plan.config_tokenizers],
    )
    # The model's own tokenizer_2/ wins for the second tokenizer unless tokenizer_path overrides.
    use_own_2 = tokenizer_path is None and own_dir_2 is not None
    vocab_dir_2, vocab_source_2 = (
        (own_dir_2, f"{where}: the tokenizer in {own_dir_2}")
        if use_own_2
        else (
            vocab_dir,
            vocab_source,
        )
    )

    unet, vae, text_encoder, text_encoder_2 = plan.load(dtype)
    freeze(unet, vae, text_encoder, text_encoder_2, dtype=dtype)
    _check_widths(unet, text_encoder, text_encoder_2, where)
    if vae.config.get("scaling_factor") != SDXL_VAE_SCALING_FACTOR:
        log.warning(
            "%s: the VAE config says scaling_factor %s; SDXL VAEs use %s, which lorad uses",
            where,
            vae.config.get("scaling_factor"),
            SDXL_VAE_SCALING_FACTOR,
        )
    tokenizer = open_tokenizer(vocab_dir, text_encoder, vocab_source)
    tokenizer_2 = open_tokenizer(vocab_dir_2, text_encoder_2, vocab_source_2)
    if vocab_dir != own_dir:
        _set_pad_token(tokenizer, "tokenizer")
    if vocab_dir_2 != own_dir_2:
        _set_pad_token(tokenizer_2, "tokenizer_2")
    return SDXLComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        noise_scheduler=training_scheduler(plan.scheduler_config, prediction_type, zero_terminal_snr),
        prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr,
        source=str(source),
    )


def inspect_sdxl_model(
    base_model: str, *, base_dir: Path | None = None, allow_pickle: bool = False, model_config_dir: Path | None = None
) -> Path:
    """The cheap phase of :func:`load_sdxl_components` alone: a diffusers-layout folder whose ``unet/``,
    ``text_encoder/`` and ``text_encoder_2/`` configs describe ``base_model``. Reads file headers and
    configs, never weights (a pickle checkpoint is read whole, only with ``allow_pickle``). Raises
    ModelLoadError as loading would."""
    _, plan = _plan(base_model, base_dir, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    return plan.configs


def sdxl_modules_on_meta(
    base_model: str, *, allow_pickle: bool = False, model_config_dir: Path | None = None
) -> tuple[UNet2DConditionModel, list[torch.nn.Module]]:
    """(UNet, [CLIP-L, OpenCLIP bigG]) of ``base_model`` on the ``meta`` device: shapes and names, no
    memory, no weights (``config --check`` resolves target names on them). ModelLoadError as loading."""
    from transformers import CLIPTextConfig

    configs = inspect_sdxl_model(base_model, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    where = f"`base_model` {base_model!r}"

    def text(part: str) -> CLIPTextConfig:
        return CLIPTextConfig.from_dict(read_json_object(configs / part / "config.json", where))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_json_object(configs / "unet" / "config.json", where))
        return unet, [CLIPTextModel(text("text_encoder")), CLIPTextModelWithProjection(text("text_encoder_2"))]


def _plan(
    base_model: str, base_dir: Path | None, *, allow_pickle: bool, model_config_dir: Path | None
) -> tuple[Path, _Plan]:
    """The cheap phase: where ``base_model`` is, what it is, and how to load it."""
    where = f"`base_model` {base_model!r}"
    source = resolve_base_model(base_model, base_dir=base_dir)
    config_dir = resolve_optional_path(model_config_dir, base_dir)
    if config_dir is not None:
        check_model_config_dir(config_dir, SDXL_COMPONENTS)
    if source.is_dir():
        return source, _plan_folder(source, where, allow_pickle=allow_pickle, config_dir=config_dir)
    return source, _plan_single_file(source, where, allow_pickle=allow_pickle, config_dir=config_dir)


def training_scheduler(config: Mapping[str, Any], prediction_type: str, zero_terminal_snr: bool) -> DDPMScheduler:
    """A DDPM scheduler for training from a model's scheduler config (any class: only the betas matter).

    ``zero_terminal_snr`` uses diffusers' ``rescale_betas_zero_snr`` (Lin et al. 2023, what kohya's
    ``--zero_terminal_snr`` does): the last timestep's signal becomes exactly zero.
    """
    return DDPMScheduler.from_config(
        dict(config), prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr
    )


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    """Give a tokenizer built from a shared CLIP vocabulary the pad token SDXL base uses for ``role``."""
    shipped = read_json_object(SDXL_CONFIGS / role / "tokenizer_config.json", "the shipped SDXL tokenizer configs")
    tokenizer.pad_token = shipped["pad_token"]


def _check_widths(unet: UNet2DConditionModel, te1: CLIPTextModel, te2: CLIPTextModelWithProjection, where: str) -> None:
    context = te1.config.hidden_size + te2.config.hidden_size
    pooled = te2.config.projection_dim
    time_dim = unet.config.addition_time_embed_dim
    added = unet.config.projection_class_embeddings_input_dim
    if unet.config.cross_attention_dim != context or added != pooled + 6 * time_dim:
        raise ModelLoadError(
            f"{where}: the UNet does not fit the text encoders (cross-attention width "
            f"{unet.config.cross_attention_dim} vs {te1.config.hidden_size}+{te2.config.hidden_size}; "
            f"added conditioning {added} vs {pooled}+6x{time_dim})",
            "The model is broken or not an SDXL base model; use another copy.",
        )


# --- diffusers folders ----------------------------------------------------------------------------------


def inspect_sdxl_folder(folder: Path, where: str, *, allow_pickle: bool) -> FolderInfo:
    """Recognise an SDXL diffusers folder from its JSON files and weight names; refuse the refiner,
    inpainting UNets, non-SDXL folders and unusable weights before reading any weights."""
    index_path = folder / "model_index.json"
    index = read_json_object(index_path, where) if index_path.is_file() else {}
    class_name = str(index.get("_class_name", ""))
    unet_path = folder / "unet" / "config.json"
    unet_config = read_json_object(unet_path, where) if unet_path.is_file() else {}
    if not is_sdxl_folder(folder):
        raise ModelLoadError(f"{where} is a {class_name or 'diffusers'} folder, not an SDXL model", SDXL_HINT)
    if (
        index.get("requires_aesthetics_score")
        or "Img2Img" in class_name
        or not (folder / "text_encoder").is_dir()
        or unet_config.get("cross_attention_dim") == 1280
    ):
        raise ModelLoadError(
            f"{where} is the SDXL refiner (one text encoder, aesthetic-score conditioning)", _REFINER_HINT
        )
    missing = [f"{c}/config.json" for c in SDXL_COMPONENTS if not (folder / c / "config.json").is_file()]
    if missing:
        raise ModelLoadError(
            f"{where}: the diffusers folder {folder} lacks {', '.join(missing)}",
            "An SDXL diffusers model needs unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
            "tokenizer_2/ and scheduler/; re-download or re-export it completely.",
        )
    check_unet_in_channels(unet_config.get("in_channels", 4), where)
    options = {
        c: weights_options(folder / c, *STEMS[c], allow_pickle=allow_pickle, where=where) for c in SDXL_COMPONENTS
    }
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path, where) if scheduler_path.is_file() else None
    return FolderInfo("sdxl", options, scheduler)


def _plan_folder(folder: Path, where: str, *, allow_pickle: bool, config_dir: Path | None) -> _Plan:
    info = inspect_sdxl_folder(folder, where, allow_pickle=allow_pickle)
    scheduler_config = info.scheduler_config
    if scheduler_config is None:
        log.warning("%s has no scheduler/; using the shipped SDXL scheduler config", where)
        scheduler_config = read_json_object(SDXL_CONFIGS / "scheduler" / "scheduler_config.json", where)

    def load(dtype: torch.dtype) -> _Modules:
        classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, **dict(_TEXT_ENCODERS)}
        return tuple(  # type: ignore[return-value]
            load_component(folder, c, classes[c], info.load_options[c], dtype, where) for c in SDXL_COMPONENTS
        )

    own = [folder / name if has_tokenizer_files(folder / name) else None for name in ("tokenizer", "tokenizer_2")]
    return _Plan(
        scheduler_config=scheduler_config,
        # diffusers' own default when a scheduler config names no prediction type.
        default_prediction="epsilon",
        default_zero_snr=False,
        model_tokenizers=(own[0], own[1]),
        config_tokenizers=[config_dir / "tokenizer"] if config_dir else [],
        configs=folder,
        load=load,
    )


# --- single files ---------------------------------------------------------------------------------------


def probe_sdxl_checkpoint(shapes: Mapping[str, Sequence[int]], where: str) -> SDXLCheckpointInfo:
    """Recognise an SDXL base-family single file from its key names and shapes.

    Raises ModelLoadError for the refiner, EDM-schedule models, inpainting UNets, files that are
    not SGM-layout checkpoints, and files missing a component.
    """
    keys = list(shapes)
    if not is_sdxl_keys(keys):
        raise ModelLoadError(f"{where} is not an SDXL checkpoint (no `conditioner.embedders.*` keys)", SDXL_HINT)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
        k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in keys
    ):
        raise ModelLoadError(f"{where} is the SDXL refiner (one OpenCLIP text encoder)", _REFINER_HINT)
    if "edm_mean" in shapes or "edm_vpred.sigma_max" in shapes:
        raise ModelLoadError(
            f"{where} uses an EDM noise schedule (Playground v2.5, CosXL and similar), which lorad cannot train",
            "Use an SDXL checkpoint trained with the standard DDPM schedule (epsilon or v-prediction).",
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(f"{where} has no SDXL UNet (`model.diffusion_model.input_blocks.0.0.weight`)", SDXL_HINT)
    check_unet_in_channels(conv_in[1], where)
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    if label is None:
        raise ModelLoadError(f"{where} has a UNet without SDXL's size conditioning (`label_emb`)", SDXL_HINT)
    token = shapes.get(SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight")
    token_2 = shapes.get(SDXL_OPEN_CLIP_PREFIX + "token_embedding.weight")
    if token is None or token_2 is None:
        which = "first (CLIP-L, `conditioner.embedders.0.transformer.*`)" if token is None else "second"
        raise ModelLoadError(
            f"{where} lacks the {which} text encoder; it may be a UNet-only export",
            "lorad needs a full checkpoint (UNet, VAE and both text encoders) or a diffusers model folder.",
        )
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise ModelLoadError(
            f"{where} has no VAE weights (`first_stage_model.*`)",
            "lorad needs a full checkpoint (UNet, VAE and both text encoders) or a diffusers model folder.",
        )
    context_keys = sorted(k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    if not context_keys:
        raise ModelLoadError(f"{where} has a UNet without cross-attention", SDXL_HINT)
    context_dim, width, width_2 = shapes[context_keys[0]][1], token[1], token_2[1]
    if context_dim != width + width_2:
        raise ModelLoadError(
            f"{where} is inconsistent: the UNet attends to {context_dim}-wide text features but the text "
            f"encoders are {width} + {width_2} wide",
            "The file is probably a broken merge; use another copy of the model.",
        )
    return SDXLCheckpointInfo(
        context_dim=int(context_dim),
        model_channels=int(conv_in[0]),
        added_cond_dim=int(label[1]),
        text_width=int(width),
        text_width_2=int(width_2),
        v_pred=V_PRED_MARKER in shapes,
        zero_terminal_snr=ZERO_SNR_MARKER in shapes,
    )


def _check_sdxl_config_fits(info: SDXLCheckpointInfo, configs: Path, where: str, config_where: str) -> None:
    unet = read_json_object(configs / "unet" / "config.json", config_where)
    text = read_json_object(configs / "text_encoder" / "config.json", config_where)
    text_2 = read_json_object(configs / "text_encoder_2" / "config.json", config_where)
    found = {
        "UNet cross-attention width": (unet.get("cross_attention_dim"), info.context_dim),
        "UNet first-level width": ((unet.get("block_out_channels") or [None])[0], info.model_channels),
        "UNet added-conditioning width": (unet.get("projection_class_embeddings_input_dim"), info.added_cond_dim),
        "first text encoder width": (text.get("hidden_size"), info.text_width),
        "second text encoder width": (text_2.get("hidden_size"), info.text_width_2),
    }
    wrong = [
        f"{name} {got} in the checkpoint vs {want} in the config" for name, (want, got) in found.items() if want != got
    ]
    if wrong:
        raise ModelLoadError(
            f"{where} does not match {config_where}: " + "; ".join(wrong),
            "Set `model_config_dir` to a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, "
            "text_encoder_2/, scheduler/ configs) that describes this checkpoint's architecture.",
        )


def _plan_single_file(path: Path, where: str, *, allow_pickle: bool, config_dir: Path | None) -> _Plan:
    state: dict[str, torch.Tensor] | None = None
    if is_pickle_path(path):
        if not allow_pickle:
            raise ModelLoadError(
                f"{where} is a pickle-based checkpoint ({path.suffix}); pickle files can run code when loaded",
                PICKLE_HINT,
            )
        state = read_pickle_checkpoint(path, where)
        info = probe_sdxl_checkpoint({k: tuple(v.shape) for k, v in state.items()}, where)
    else:
        info = probe_sdxl_checkpoint(read_safetensors_shapes(path, where), where)
    if config_dir is not None:
        configs, config_where = config_dir, f"`model_config_dir` {str(config_dir)!r}"
    else:
        configs, config_where = SDXL_CONFIGS, "the shipped SDXL base 1.0 configs"
    _check_sdxl_config_fits(info, configs, where, config_where)
    scheduler_path = configs / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file() and configs != SDXL_CONFIGS:
        scheduler_config = read_json_object(scheduler_path, config_where)
    else:
        scheduler_config = read_json_object(SDXL_CONFIGS / "scheduler" / "scheduler_config.json", where)
    # The file's own markers describe it better than any config folder (often SDXL base's).
    if info.v_pred:
        scheduler_config["prediction_type"] = "v_prediction"
    if info.zero_terminal_snr:
        scheduler_config["rescale_betas_zero_snr"] = True

    def load(dtype: torch.dtype) -> _Modules:
        tensors = state if state is not None else read_safetensors(path, where)
        log.info("%s: SDXL checkpoint, converting with %s", where, config_where)
        unet, vae, (te1, te2) = convert_single_file(tensors, configs, dtype, where, text_encoders=_TEXT_ENCODERS)
        return unet, vae, te1, te2

    return _Plan(
        scheduler_config=scheduler_config,
        default_prediction="epsilon",
        default_zero_snr=False,
        model_tokenizers=(None, None),
        config_tokenizers=[config_dir / "tokenizer"] if config_dir else [],
        configs=configs,
        load=load,
    )
