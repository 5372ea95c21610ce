"""The FLUX.1 training config: the image keys every image family shares, plus FLUX's own.

FLUX's keys carry kohya's names (``clip_l``, ``t5xxl``, ``ae``, ``timestep_sampling``,
``sigmoid_scale``, ``discrete_flow_shift``, ``guidance_scale``, ``t5xxl_max_token_length``,
``blocks_to_swap``, ``fp8_base``). Keys of the SD config that mean nothing for a flow-matching transformer
(UNet targets, prediction type, min-SNR, noise offset, pickle checkpoints) are refused with the
key to use instead, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.config.loader import image_checks, parse_family_config
from lorad.config.schema import REQUIRED_KEYS, TrainConfig, redefault, spec
from lorad.errors import ConfigProblem
from lorad.sampling.prompts import MAX_CFG, SamplePrompts
from lorad.sampling.samplers import sampler_problem

if TYPE_CHECKING:
    from lorad.models.flux_loader import FluxSources, TransformerSource

TIMESTEP_SAMPLINGS = ("flux_shift", "shift", "sigmoid", "uniform")  # lorad.diffusion.flow_matching's names
BASE_QUANTIZATIONS = ("none", "fp8", "int8", "nf4")  # lorad.models.quantization's names
OUTPUT_FORMATS = ("kohya", "diffusers", "comfyui")
# Sample steps when neither sample_steps nor a prompt's --s says: kohya's 20 for dev; schnell is distilled to 1-4.
DEFAULT_SAMPLE_STEPS = {"dev": 20, "schnell": 4}
SAMPLE_SIDE_MULTIPLE = 16  # 8 pixels per latent, then 2x2 latents per transformer token
# SD keys with no meaning here -> what to use instead.
_NOT_FOR_FLUX = {
    "unet_target_modules": "FLUX has no UNet; name its layers in `transformer_target_modules`",
    "prediction_type": "FLUX always predicts the flow velocity; remove it",
    "min_snr_gamma": "min-SNR weighting is for DDPM models; shape the noise levels with `timestep_sampling`",
    "noise_offset": "not used by flow matching; remove it",
    "allow_pickle": "FLUX weights are read from .safetensors only; remove it",
    "tokenizer_path": "FLUX has two tokenizers: use `clip_l_tokenizer` and `t5xxl_tokenizer`",
}

# Image-family options the FLUX run does not implement yet: refused when set to anything but their default.
_NOT_YET_FOR_FLUX = {
    "network_type": "FLUX trains PEFT LoRA only for now; remove it (or set lora)",
    "flip_aug": "not implemented for FLUX yet; remove it",
    "random_crop": "not implemented for FLUX yet; remove it",
    "masked_loss": "not implemented for FLUX yet; remove it",
    "mask_dir": "not implemented for FLUX yet (masked_loss); remove it",
    "reg_data_dir": "regularization images are not implemented for FLUX yet; remove it",
    "prior_loss_weight": "regularization images are not implemented for FLUX yet; remove it",
    "clip_skip": "FLUX reads CLIP-L's pooled output only, which clip_skip does not change; remove it",
    "multires_noise_iterations": "a DDPM noise option; shape the noise levels with `timestep_sampling`",
    "multires_noise_discount": "a DDPM noise option; shape the noise levels with `timestep_sampling`",
    "ip_noise_gamma": "a DDPM noise option; not implemented for flow matching",
    "min_timestep": "FLUX draws noise levels, not DDPM timesteps: use `timestep_sampling`",
    "max_timestep": "FLUX draws noise levels, not DDPM timesteps: use `timestep_sampling`",
    "cache_text_encoder_outputs": "FLUX always caches CLIP-L's and T5's outputs (T5 is never in memory while "
    "the transformer trains); remove it",
}


@dataclass(frozen=True, kw_only=True)
class FluxTrainConfig(TrainConfig):
    """A validated FLUX.1 (dev or schnell) LoRA config. All paths are absolute."""

    # --- model --------------------------------------------------------------------------------
    clip_l: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "CLIP-L text encoder file (clip_l.safetensors, as ComfyUI/Forge keep it). Needed when base_model is a "
            "single file; overrides a diffusers folder's text_encoder/.",
            example="./models/clip/clip_l.safetensors",
        ),
    )
    t5xxl: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "T5-XXL text encoder file (t5xxl_fp16.safetensors, or an fp8 copy). Needed when base_model is a single "
            "file; overrides a diffusers folder's text_encoder_2/. Its outputs are cached before training, so T5 is "
            "never in memory while the transformer trains.",
            example="./models/clip/t5xxl_fp16.safetensors",
        ),
    )
    ae: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "FLUX autoencoder file (ae.safetensors). Needed when base_model is a single file; overrides a diffusers "
            "folder's vae/.",
            example="./models/vae/ae.safetensors",
        ),
    )
    clip_l_tokenizer: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "Folder with CLIP-L's tokenizer. Unset: base_model's or model_config_dir's tokenizer/, then the local "
            "Hugging Face cache.",
        ),
    )
    t5xxl_tokenizer: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "Folder with T5's tokenizer (tokenizer.json). Unset: base_model's or model_config_dir's tokenizer_2/, "
            "then the local Hugging Face cache.",
        ),
    )
    t5xxl_max_token_length: int | None = field(
        default=None,
        metadata=spec(
            "model", "T5 tokens per caption. Unset: 512 for dev, 256 for schnell (kohya's defaults).", minimum=1
        ),
    )
    base_quantization: str = field(
        default="none",
        metadata=spec(
            "model",
            "Store the frozen transformer's block weights quantized (torchao, weight-only: any GPU or the CPU): "
            "fp8 (float8 with per-row scales), int8, or nf4 (QLoRA's 4-bit). Needs `pip install 'lorad[quant]'`.",
            choices=BASE_QUANTIZATIONS,
        ),
    )
    fp8_base: bool = field(
        default=False,
        metadata=spec(
            "model",
            "Store the frozen transformer blocks' weights as float8 (e4m3, scaled per channel) and upcast each layer "
            "as it computes, as kohya's fp8_base and SDXL's here: about half the memory of bf16, no extra library. "
            "Works with blocks_to_swap; use it or base_quantization, not both. The fp8 model is kept resident apart "
            "from the full-precision one.",
        ),
    )
    blocks_to_swap: int = field(
        default=0,
        metadata=spec(
            "model",
            "Keep this many of the transformer's 57 blocks in CPU memory, each copied to the GPU just before it runs "
            "(overlapped with compute). Saves VRAM at some speed; use with gradient_checkpointing.",
            minimum=0,
        ),
    )

    # --- lora ---------------------------------------------------------------------------------
    transformer_target_modules: tuple[str, ...] = field(
        default=("all-linear",),
        metadata=spec(
            "lora",
            "Transformer layers that get LoRA: a set (attention, attention+mlp, all-linear: every linear layer of "
            "the double and single blocks, kohya's and ai-toolkit's default) or diffusers module names (to_q, "
            "add_q_proj, proj_mlp, single_transformer_blocks.3.proj_out, ...).",
        ),
    )
    text_encoder_target_modules: tuple[str, ...] = redefault(
        TrainConfig,
        "text_encoder_target_modules",
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        help="CLIP-L layers that get LoRA when train_text_encoder is on (q_proj, k_proj, v_proj, out_proj, fc1, fc2).",
    )

    # --- training -----------------------------------------------------------------------------
    resolution: int = redefault(
        TrainConfig,
        "resolution",
        1024,
        help="Training resolution (pixels per side of the target area); a multiple of 16. FLUX.1: 512-1024.",
    )
    timestep_sampling: str = field(
        default="flux_shift",
        metadata=spec(
            "training",
            "How noise levels are drawn (kohya's names): flux_shift (sigmoid draws shifted by resolution, as "
            "FLUX.1-dev samples; kohya's recommendation), shift (sigmoid draws shifted by discrete_flow_shift), "
            "sigmoid, uniform.",
            choices=TIMESTEP_SAMPLINGS,
        ),
    )
    sigmoid_scale: float = field(
        default=1.0,
        metadata=spec(
            "training",
            "Scale of the normal draw before the sigmoid (sigmoid, shift, flux_shift); larger spreads the levels.",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )
    discrete_flow_shift: float = field(
        default=3.0,
        metadata=spec(
            "training",
            "timestep_sampling: shift only: s in sigma' = s*sigma / (1 + (s-1)*sigma); above 1 favours noisier steps.",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )
    guidance_scale: float = field(
        default=1.0,
        metadata=spec(
            "training",
            "FLUX.1-dev's guidance embedding during training (kohya: 1.0). Ignored for schnell.",
            minimum=0.0,
        ),
    )

    # --- samples ------------------------------------------------------------------------------
    sample_sampler: str = redefault(
        TrainConfig,
        "sample_sampler",
        "flow_match_euler",
        help="Sampler of the sample images (a prompt's --ss overrides it): flow_match_euler (FluxPipeline's "
        "FlowMatchEulerDiscreteScheduler), the one sampler for flow-matching models.",
    )
    sample_steps: int | None = redefault(
        TrainConfig,
        "sample_steps",
        None,
        help="Steps per sample image (--s). Unset: 20 for FLUX.1-dev, 4 for schnell.",
    )
    sample_cfg_scale: float = redefault(
        TrainConfig,
        "sample_cfg_scale",
        1.0,
        help="True classifier-free guidance with the negative prompt (--l, --n); 1 = off, as FLUX.1 is guidance-"
        "distilled (its guidance is sample_guidance_scale). Above 1 each step runs the transformer twice.",
    )
    sample_guidance_scale: float = field(
        default=3.5,
        metadata=spec(
            "samples",
            "FLUX.1-dev's guidance embedding in the sample images (--g; FluxPipeline's default 3.5). Schnell has "
            "none and ignores it.",
            minimum=0.0,
            maximum=MAX_CFG,
        ),
    )
    sample_width: int | None = redefault(
        TrainConfig,
        "sample_width",
        None,
        help="Width of the samples in pixels (--w), a multiple of 16. Unset: resolution.",
    )
    sample_height: int | None = redefault(
        TrainConfig,
        "sample_height",
        None,
        help="Height of the samples in pixels (--h), a multiple of 16. Unset: resolution.",
    )

    # --- output -------------------------------------------------------------------------------
    output_format: tuple[str, ...] = field(
        default=("kohya", "diffusers"),
        metadata=spec(
            "output",
            "Files to write, one or several: kohya (BFL keys: ComfyUI, Forge, kohya), diffusers "
            "(pytorch_lora_weights.safetensors for FluxPipeline.load_lora_weights), comfyui (diffusion_model. keys "
            "with lora_A/lora_B).",
        ),
    )


FLUX_REQUIRED_KEYS = REQUIRED_KEYS


def sample_problems(
    prompts: SamplePrompts, sampler: str, width: int | None = None, height: int | None = None
) -> list[ConfigProblem]:
    """Why FLUX cannot draw these sample settings: a denoising-diffusion sampler (``sample_sampler`` or a
    prompt's ``--ss``), or a side that is not a multiple of 16 (``sample_width``/``sample_height``, --w/--h)."""
    problems = []
    if why := sampler_problem(sampler, flow=True):
        problems.append(ConfigProblem("sample_sampler", f"{sampler!r} {why}"))
    for key, side in (("sample_width", width), ("sample_height", height)):
        if side is not None and side % SAMPLE_SIDE_MULTIPLE:
            fix = f"FLUX draws multiples of {SAMPLE_SIDE_MULTIPLE}, e.g. {side - side % SAMPLE_SIDE_MULTIPLE}"
            problems.append(ConfigProblem(key, f"got {side}", fix))
    for number, prompt in enumerate(prompts.prompts, 1):
        where = f"prompt {number} ({prompt.prompt[:40]!r})"
        if prompt.sampler and (why := sampler_problem(prompt.sampler, flow=True)):
            problems.append(ConfigProblem("sample_prompts", f"{where}: --ss {prompt.sampler} {why}"))
        for option, side in (("--w", prompt.width), ("--h", prompt.height)):
            if side is not None and side % SAMPLE_SIDE_MULTIPLE:
                rounded = side - side % SAMPLE_SIDE_MULTIPLE
                fix = f"FLUX draws multiples of {SAMPLE_SIDE_MULTIPLE}, e.g. {option} {rounded}"
                problems.append(ConfigProblem("sample_prompts", f"{where}: {option} {side}", fix))
    return problems


def _flux_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    problems = [ConfigProblem(key, "is not a FLUX key", fix) for key, fix in _NOT_FOR_FLUX.items() if key in values]
    defaults = {f.name: f.default for f in fields(FluxTrainConfig)}
    problems += [
        ConfigProblem(key, f"is {values[key]!r}", fix)
        for key, fix in _NOT_YET_FOR_FLUX.items()
        if key in values and values[key] != defaults[key]
    ]
    quantization = values.get("base_quantization", "none")
    if values.get("fp8_base") is True and quantization != "none":
        problems.append(
            ConfigProblem(
                "fp8_base",
                f"is true and base_quantization is {quantization!r}: the frozen weights are stored one way only",
                "keep fp8_base: true and remove base_quantization, or set fp8_base: false",
            )
        )
    for key in ("clip_l", "t5xxl", "ae"):
        path = values.get(key)
        if isinstance(path, Path) and not path.is_file():
            problems.append(ConfigProblem(key, f"{path} is not a file", "fix the path, or remove the key"))
    for key in ("clip_l_tokenizer", "t5xxl_tokenizer"):
        path = values.get(key)
        if isinstance(path, Path) and not path.is_dir():
            problems.append(ConfigProblem(key, f"{path} is not a folder", "fix the path, or remove the key"))
    formats = values.get("output_format")
    if isinstance(formats, tuple):
        bad = [f for f in formats if f not in OUTPUT_FORMATS]
        if bad:
            problems.append(
                ConfigProblem("output_format", f"unknown format {bad[0]!r}", "use kohya, diffusers and/or comfyui")
            )
        else:
            values["output_format"] = tuple(dict.fromkeys(formats))
    prompts, sampler = values.get("sample_prompts"), values.get("sample_sampler", "flow_match_euler")
    if isinstance(prompts, SamplePrompts) and isinstance(sampler, str):
        # Sides that are not even a multiple of 8 are reported by the shared sampling checks already.
        width, height = (
            side if isinstance(side, int) and not side % 8 else None
            for side in (values.get("sample_width"), values.get("sample_height"))
        )
        problems += sample_problems(prompts, sampler, width, height)
    for key in ("resolution", "bucket_reso_steps"):
        value = values.get(key)
        # 8 pixels per latent, then 2x2 latents per transformer token.
        if isinstance(value, int) and value % 16 and not value % 8:
            problems.append(ConfigProblem(key, f"got {value}", f"FLUX needs a multiple of 16, e.g. {value - 8}"))
    return problems


def parse_flux_config(raw: Any, *, base_dir: Path, source: str = "config") -> FluxTrainConfig:
    """Validate a mapping of config keys into a :class:`FluxTrainConfig` (every problem at once)."""
    return parse_family_config(
        raw,
        config_class=FluxTrainConfig,
        family="flux",
        base_dir=base_dir,
        source=source,
        required=FLUX_REQUIRED_KEYS,
        default_name="flux_lora",
        checks=[*image_checks(base_dir), _flux_checks],
    )


def flux_sources(config: FluxTrainConfig, *, transformer_source: TransformerSource | None = None) -> FluxSources:
    """Every model part ``config`` names, found and checked without reading weights (ModelLoadError naming
    the key at fault). ``transformer_source`` is a resident model's transformer, not looked up again."""
    from lorad.models.flux_loader import resolve_flux_model

    return resolve_flux_model(
        config.base_model,
        clip_l=config.clip_l,
        t5xxl=config.t5xxl,
        ae=config.ae,
        clip_l_tokenizer=config.clip_l_tokenizer,
        t5xxl_tokenizer=config.t5xxl_tokenizer,
        model_config_dir=config.model_config_dir,
        t5xxl_max_token_length=config.t5xxl_max_token_length,
        transformer_source=transformer_source,
    )
