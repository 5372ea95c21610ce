"""The training config: every key, its type, default and help text, in one place.

`TrainConfig` is the single typed, frozen object the engine sees. It is built only by
:func:`lorad.config.loader.load_config` / :func:`~lorad.config.loader.parse_config`, which validate
every key at once. The ``help`` metadata here is the documentation: ``lorad config --example``
prints it, and the README's config reference points there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorad.sampling.prompts import MAX_CFG, MAX_SAMPLE_SIDE, MAX_SAMPLE_STEPS, SamplePrompts
from lorad.sampling.samplers import SAMPLER_CHOICES

# Sections group keys in the annotated example; order here is the order printed.
SECTIONS = ("data", "model", "lora", "training", "checkpoints", "samples", "output")

# Upper bounds shared by both configs: far beyond any real run, low enough that a value cannot
# exhaust memory (caption beams), overflow a counter (epochs, steps, seed) or stall the daemon.
MAX_TAGS = 255
MAX_CAPTION_BATCH = 256
MAX_CAPTION_TOKENS = 1024
MAX_CAPTION_BEAMS = 16
MAX_CAPTION_TOP_K = 100
MAX_ALPHA = 65536.0
MAX_LEARNING_RATE = 10.0
MAX_BATCH = 1024
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000
MAX_ACCUMULATION = 1024
MAX_GRAD_NORM = 10_000.0
MAX_WEIGHT_DECAY = 10.0
# torch.Generator seeds are 64-bit and the engine derives per-step seeds as seed * 1_000_003 + ...
MAX_SEED = 2**32 - 1
MAX_KEPT_CHECKPOINTS = 1000
MAX_REPEATS = 10_000


def spec(
    section: str,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    example: Any = None,
) -> dict[str, Any]:
    """Metadata for one config key (its section, help text and value constraints)."""
    return {
        "section": section,
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "example": example,
    }


@dataclass(frozen=True)
class RepeatPolicy:
    """How many times each image is seen per epoch.

    ``default`` applies to every folder not named in ``per_folder`` (folder paths relative to
    ``train_data_dir``, "" is the top level). A kohya-style folder name ``10_mystyle`` gives 10
    repeats when the config names no value for it.
    """

    default: int | None = None
    per_folder: tuple[tuple[str, int], ...] = ()

    def for_folder(self, rel_folder: str) -> int | None:
        """The configured repeats for a folder, or None when the config says nothing about it."""
        for name, count in self.per_folder:
            if name.strip("/") == rel_folder.strip("/"):
                return count
        return self.default

    def to_yaml(self) -> int | dict[str, int] | None:
        """The YAML spelling: a number, or a mapping with "*" for the default."""
        if not self.per_folder:
            return self.default
        mapping = dict(self.per_folder)
        if self.default is not None:
            mapping["*"] = self.default
        return mapping


@dataclass(frozen=True)
class OptimizerArgs:
    """Extra keyword arguments for the optimizer's constructor (kohya's ``optimizer_args``), in the
    order written. Values are YAML scalars or tuples (lists become tuples, so the config stays frozen)."""

    items: tuple[tuple[str, Any], ...] = ()

    def as_kwargs(self) -> dict[str, Any]:
        """The arguments as a keyword dict."""
        return dict(self.items)

    def to_yaml(self) -> dict[str, Any]:
        """The YAML spelling: a mapping (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items}


# The most devices one job may ask for (far beyond one machine; torchrun jobs are counted by torchrun).
MAX_DEVICES = 64


@dataclass(frozen=True)
class DeviceRequest:
    """Which devices a job trains on (the ``devices`` key): ``auto`` (one, the daemon chooses), a
    ``count`` of devices of the kind ``device`` says, or ``names`` (one per rank): device names such as
    ``cuda:1`` or ``cpu`` (a name given twice means two devices of that kind), or worker indices ("1")
    as ``lorad status`` numbers them."""

    count: int | None = None
    names: tuple[str, ...] = ()

    @property
    def is_auto(self) -> bool:
        return self.count is None and not self.names

    @property
    def ranks(self) -> int:
        """How many devices (ranks) the job runs on."""
        return len(self.names) or self.count or 1

    def to_yaml(self) -> str | int | list[str | int]:
        """The YAML spelling: ``auto``, a number, or a list (indices as numbers)."""
        if self.names:
            return [int(name) if name.isdigit() else name for name in self.names]
        return self.count if self.count is not None else "auto"


@dataclass(frozen=True, kw_only=True)
class TrainingKeys:
    """The keys every model family shares: base model, LoRA size, optimizer and schedule, checkpoints and
    output. A family's config class extends it with its own keys (data, model parts, targets) and may
    give a shared key another default with :func:`redefault`."""

    # --- model --------------------------------------------------------------------------------
    base_model: str = field(
        default="",
        metadata=spec(
            "model",
            "Base model: a .safetensors checkpoint (A1111 layout), a diffusers folder, or a hub id that is "
            "already in the local Hugging Face cache (nothing is downloaded). Its files say which model family it is.",
            example="./models/Stable-diffusion/v1-5-pruned.safetensors",
        ),
    )
    model_family: str = field(
        default="",
        metadata=spec(
            "model",
            "Which model family base_model is (`lorad config --example FAMILY` lists each one's keys). Unset: detected "
            "from base_model's files.",
        ),
    )
    allow_pickle: bool = field(
        default=False,
        metadata=spec(
            "model",
            "Allow base-model weights in pickle files (.ckpt/.pt/.pth/.bin, or a folder with only *.bin weights), "
            "read with torch.load(weights_only=True). Prefer .safetensors.",
        ),
    )

    # --- lora ---------------------------------------------------------------------------------
    lora_rank: int = field(
        default=8,
        metadata=spec(
            "lora", "LoRA rank (network_dim). 4-32 is typical; lower uses less memory.", minimum=1, maximum=1024
        ),
    )
    lora_alpha: float | None = field(
        default=None,
        metadata=spec(
            "lora",
            "LoRA alpha; the update is scaled by alpha/rank. Unset: equal to lora_rank.",
            minimum=0.0,
            maximum=MAX_ALPHA,
            exclusive_minimum=True,
        ),
    )
    lora_dropout: float = field(
        default=0.0, metadata=spec("lora", "Dropout on the LoRA path during training.", minimum=0.0, maximum=1.0)
    )

    # --- training -----------------------------------------------------------------------------
    batch_size: int = field(
        default=1,
        metadata=spec(
            "training",
            "Samples (images, or text rows) per step. Lower it (and raise gradient_accumulation_steps) when out of "
            "memory.",
            minimum=1,
            maximum=MAX_BATCH,
        ),
    )
    epochs: int = field(
        default=10,
        metadata=spec(
            "training", "Passes over the data (each image counted `repeats` times).", minimum=1, maximum=MAX_EPOCHS
        ),
    )
    max_train_steps: int | None = field(
        default=None,
        metadata=spec(
            "training", "Stop after this many optimizer steps; overrides epochs.", minimum=1, maximum=MAX_STEPS
        ),
    )
    learning_rate: float = field(
        default=1e-4,
        metadata=spec(
            "training",
            "Learning rate of the LoRA weights (for image families: the UNet's or transformer's).",
            minimum=0.0,
            maximum=MAX_LEARNING_RATE,
            exclusive_minimum=True,
        ),
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=spec(
            "training",
            "Micro-batches whose gradients are summed per optimizer step (a larger effective batch without more "
            "memory).",
            minimum=1,
            maximum=MAX_ACCUMULATION,
        ),
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata=spec("training", "Gradient clipping norm; 0 disables clipping.", minimum=0.0, maximum=MAX_GRAD_NORM),
    )
    optimizer: str = field(
        default="adamw",
        metadata=spec(
            "training",
            "adamw; adamw8bit, paged_adamw8bit, lion8bit (bitsandbytes, CUDA only); prodigy (sets its own step size: "
            "learning_rate 1.0); adafactor (transformers'; relative-step mode sets its own learning rate); lion "
            "(learning rate 3-10x below AdamW's); adamw_schedulefree (no schedule needed; eval-mode weights are "
            "exported); came (pytorch-optimizer's). adam_beta1/adam_beta2/adam_epsilon apply to the Adam-like ones "
            "(adamw*, prodigy, adamw_schedulefree); weight_decay to all.",
            choices=(
                "adamw",
                "adamw8bit",
                "paged_adamw8bit",
                "lion8bit",
                "prodigy",
                "adafactor",
                "lion",
                "adamw_schedulefree",
                "came",
            ),
        ),
    )
    optimizer_args: OptimizerArgs = field(
        default_factory=OptimizerArgs,
        metadata=spec(
            "training",
            "More arguments for the optimizer, checked against its signature: a mapping, e.g. {d_coef: 2, "
            'safeguard_warmup: true} for prodigy, or kohya\'s list form ["d_coef=2", "betas=(0.9,0.99)"]. '
            "They override the adam_*/weight_decay keys.",
            example={},
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=spec("training", "AdamW beta1.", minimum=0.0, maximum=1.0))
    adam_beta2: float = field(default=0.999, metadata=spec("training", "AdamW beta2.", minimum=0.0, maximum=1.0))
    adam_epsilon: float = field(
        default=1e-8, metadata=spec("training", "AdamW epsilon.", minimum=0.0, maximum=1.0, exclusive_minimum=True)
    )
    weight_decay: float = field(
        default=1e-2, metadata=spec("training", "AdamW weight decay.", minimum=0.0, maximum=MAX_WEIGHT_DECAY)
    )
    lr_scheduler: str = field(
        default="constant",
        metadata=spec(
            "training",
            "Learning-rate schedule after warmup.",
            choices=("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        ),
    )
    lr_warmup_steps: int = field(
        default=0,
        metadata=spec("training", "Steps of linear warmup from 0 to the learning rate.", minimum=0, maximum=MAX_STEPS),
    )
    lr_scheduler_num_cycles: int = field(
        default=1,
        metadata=spec(
            "training",
            "cosine_with_restarts: how many times the cosine restarts over the run.",
            minimum=1,
            maximum=1000,
        ),
    )
    lr_scheduler_power: float = field(
        default=1.0,
        metadata=spec(
            "training",
            "polynomial: the power of the decay (1 is linear).",
            minimum=0.0,
            maximum=10.0,
            exclusive_minimum=True,
        ),
    )
    lr_scheduler_min_lr_ratio: float = field(
        default=0.0,
        metadata=spec(
            "training",
            "polynomial: the learning rate it decays to, as a fraction of learning_rate.",
            minimum=0.0,
            maximum=0.99,
        ),
    )
    mixed_precision: str = field(
        default="auto",
        metadata=spec(
            "training",
            "Autocast precision. auto: bf16 on GPUs that support it, else fp16 on CUDA, no on CPU.",
            choices=("auto", "no", "fp16", "bf16"),
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=spec("training", "Recompute activations in the backward pass: much less memory, ~20% slower."),
    )
    oom_recovery: bool = field(
        default=True,
        metadata=spec(
            "training",
            "When a step runs out of memory: halve the micro-batch and double the accumulation (same effective "
            "batch), then turn on gradient_checkpointing, then the family's own savings (e.g. fp8_base), and redo "
            "that step; each change is logged. false: fail at once with a hint.",
        ),
    )
    torch_compile: bool = field(
        default=False,
        metadata=spec(
            "training",
            "Compile the denoiser (or language model) with torch.compile: faster steps after a first step that "
            "takes minutes (reported apart in training_summary.json). Needs a C++ compiler; meant for GPUs.",
        ),
    )
    seed: int = field(
        default=42,
        metadata=spec(
            "training", "Random seed; the same seed and data give the same LoRA on CPU.", minimum=0, maximum=MAX_SEED
        ),
    )
    device: str = field(
        default="auto",
        metadata=spec("training", "Where to train: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."),
    )
    devices: DeviceRequest = field(
        default_factory=DeviceRequest,
        metadata=spec(
            "training",
            "How many devices train this job together (data parallel; the daemon runs one worker per GPU): `auto` "
            "(one, the daemon picks a free one, preferring where the base model is loaded), a count such as 2 (of "
            "the kind `device` names), or a list of devices or worker indices such as [cuda:0, cuda:1] or [0, 2]. "
            "batch_size is per device: the global batch is batch_size × devices × gradient_accumulation_steps.",
        ),
    )

    ema_decay: float | None = field(
        default=None,
        metadata=spec(
            "training",
            "Keep an exponential moving average of the LoRA weights with this decay (0.999 is typical; it starts at "
            "the weights after the first step) and export it as ema_export says; unset disables.",
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
        ),
    )
    ema_export: str = field(
        default="alongside",
        metadata=spec(
            "training",
            "With ema_decay: `alongside` writes the EMA weights beside the trained ones (image LoRAs: "
            "<output_name>-ema.safetensors; LLMs: adapter-ema/); `instead` exports only the EMA weights.",
            choices=("alongside", "instead"),
        ),
    )

    # --- checkpoints --------------------------------------------------------------------------
    save_steps: int | None = field(
        default=None,
        metadata=spec(
            "checkpoints",
            "Save a resumable checkpoint every N optimizer steps; unset disables.",
            minimum=1,
            maximum=MAX_STEPS,
        ),
    )
    save_every_n_epochs: int | None = field(
        default=None,
        metadata=spec(
            "checkpoints",
            "Save a resumable checkpoint every N epochs; unset disables.",
            minimum=1,
            maximum=MAX_EPOCHS,
        ),
    )
    keep_checkpoints: int = field(
        default=3,
        metadata=spec(
            "checkpoints",
            "How many of the newest checkpoints to keep (older ones are deleted).",
            minimum=1,
            maximum=MAX_KEPT_CHECKPOINTS,
        ),
    )
    resume_from: Path | None = field(
        default=None,
        metadata=spec(
            "checkpoints",
            "A checkpoint folder of this run (output_dir/checkpoints/step-N) or `latest`, "
            "to continue exactly where it stopped.",
        ),
    )

    # --- samples ------------------------------------------------------------------------------
    sample_every_n_steps: int | None = field(
        default=None,
        metadata=spec(
            "samples",
            "Draw the sample prompts every N optimizer steps (and once more at the end); unset disables. Sampling "
            "never changes what is trained: the LoRA is bit-identical with or without it.",
            minimum=1,
            maximum=MAX_STEPS,
        ),
    )
    sample_every_n_epochs: int | None = field(
        default=None,
        metadata=spec(
            "samples", "Draw the sample prompts every N epochs; unset disables.", minimum=1, maximum=MAX_EPOCHS
        ),
    )
    sample_at_first: bool = field(
        default=False,
        metadata=spec(
            "samples",
            "Draw the sample prompts before the first step, without the LoRA: a baseline to compare the later "
            "samples with (image families; step 0 in the file names).",
        ),
    )

    # --- output -------------------------------------------------------------------------------
    output_dir: Path = field(
        default=Path("output"),
        metadata=spec(
            "output",
            "Folder for the LoRA files (or adapter), checkpoints, logs and training_summary.json.",
            example="./output/my_style_lora",
        ),
    )
    output_name: str = field(
        default="",
        metadata=spec("output", "File name of the LoRA (`<lora:NAME:0.8>` in A1111). Unset: output_dir's folder name."),
    )
    save_precision: str = field(
        default="fp16", metadata=spec("output", "Precision of the saved LoRA files.", choices=("fp16", "bf16", "fp32"))
    )

    @property
    def effective_lora_alpha(self) -> float:
        """lora_alpha, or lora_rank when unset."""
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (paths as strings), in the same keys the YAML uses."""
        return config_to_dict(self)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingKeys):
    """A validated Stable Diffusion 1.x/2.x LoRA config, and the base of the other image families'
    configs (captions, buckets, latents, UNet and text-encoder targets). All paths are absolute."""

    # --- data ---------------------------------------------------------------------------------
    train_data_dir: Path = field(
        metadata=spec(
            "data",
            "Folder of training images (jpg, jpeg, png, webp, bmp), searched recursively.",
            example="./data/style_train",
        )
    )
    metadata_path: Path | None = field(
        default=None,
        metadata=spec(
            "data",
            "CSV with a header `file,caption` (file relative to train_data_dir). When unset, "
            "captions come from `<image>.txt` sidecar files.",
            example="./data/style_train/metadata.csv",
        ),
    )
    caption_extension: str = field(
        default=".txt", metadata=spec("data", "Extension of sidecar caption files beside each image.")
    )
    repeats: RepeatPolicy = field(
        default_factory=RepeatPolicy,
        metadata=spec(
            "data",
            "Times each image is seen per epoch: a number for all folders, or a mapping "
            '{subfolder: number, "*": default}. Unset: a kohya folder name like `10_mystyle` gives 10, else 1.',
            example=1,
        ),
    )
    trigger_word: str | None = field(
        default=None,
        metadata=spec(
            "data",
            "Word put first in every caption that lacks it; use it in prompts to call the LoRA.",
            example="mystyle",
        ),
    )
    shuffle_caption: bool = field(
        default=False, metadata=spec("data", "Shuffle comma-separated tags of each caption every time it is used.")
    )
    keep_tokens: int = field(
        default=0,
        metadata=spec(
            "data", "With shuffle_caption: how many leading tags stay in place.", minimum=0, maximum=MAX_TAGS
        ),
    )
    caption_dropout: float = field(
        default=0.0,
        metadata=spec(
            "data",
            "Probability of training a sample with an empty caption (helps the LoRA generalise).",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    captioner: str | None = field(
        default=None,
        metadata=spec(
            "data",
            "Caption the images that have none before training, writing the captions into metadata_path "
            "(created if missing) or <image>.txt sidecars so later runs reuse them: blip (sentences; BLIP and the "
            "other image-to-text models transformers loads), wd14 (booru tags from a WD14 ONNX tagger), clip "
            "(phrases of a vocabulary ranked by CLIP). Unset: images without a caption are skipped.",
            choices=("blip", "wd14", "clip"),
            example="blip",
        ),
    )
    captioner_model: str = field(
        default="",
        metadata=spec(
            "data",
            "The captioner's model: a folder, or a Hugging Face id already in the local cache. Unset: "
            "Salesforce/blip-image-captioning-large, SmilingWolf/wd-v1-4-convnext-tagger-v2 or "
            "openai/clip-vit-large-patch14, from the local cache.",
            example="./models/blip-large",
        ),
    )
    caption_batch_size: int = field(
        default=8,
        metadata=spec(
            "data",
            "Images captioned per batch (images of similar size are batched together).",
            minimum=1,
            maximum=MAX_CAPTION_BATCH,
        ),
    )
    caption_max_length: int = field(
        default=75,
        metadata=spec("data", "blip: at most this many tokens per caption.", minimum=1, maximum=MAX_CAPTION_TOKENS),
    )
    caption_beams: int = field(
        default=1,
        metadata=spec(
            "data", "blip: beam search width; 1 is greedy decoding (fastest).", minimum=1, maximum=MAX_CAPTION_BEAMS
        ),
    )
    caption_prompt: str = field(
        default="",
        metadata=spec("data", 'blip: text every caption continues, e.g. "a photo of" (conditional captioning).'),
    )
    caption_general_threshold: float = field(
        default=0.35,
        metadata=spec("data", "wd14: lowest score a general tag needs to be written.", minimum=0.0, maximum=1.0),
    )
    caption_character_threshold: float = field(
        default=0.85,
        metadata=spec("data", "wd14: lowest score a character tag needs to be written.", minimum=0.0, maximum=1.0),
    )
    caption_exclude_tags: tuple[str, ...] = field(
        default=(),
        metadata=spec("data", 'wd14: tags never written, e.g. ["simple background"] (underscores or spaces).'),
    )
    caption_vocabulary: Path | None = field(
        default=None,
        metadata=spec(
            "data",
            "clip: a phrase file, one per line, `[section N]` lines keep the N best of a section. Unset: "
            "lorad's built-in subject/medium/style/lighting/colour/composition phrases.",
        ),
    )
    caption_top_k: int = field(
        default=3,
        metadata=spec(
            "data",
            "clip: phrases kept from each vocabulary section that does not say how many.",
            minimum=1,
            maximum=MAX_CAPTION_TOP_K,
        ),
    )
    resolution: int = field(
        default=512,
        metadata=spec(
            "data",
            "Training resolution (pixels per side of the target area). SD1.x: 512; SD2.x-768: 768.",
            minimum=64,
            maximum=4096,
        ),
    )
    enable_bucket: bool = field(
        default=True,
        metadata=spec(
            "data",
            "Aspect-ratio bucketing: train each image near its own aspect ratio instead of "
            "center-cropping to a square.",
        ),
    )
    bucket_no_upscale: bool = field(
        default=True,
        metadata=spec("data", "Never upscale images smaller than the resolution; they get a bucket of their own size."),
    )
    min_bucket_reso: int = field(
        default=256, metadata=spec("data", "Smallest bucket side in pixels.", minimum=64, maximum=8192)
    )
    max_bucket_reso: int = field(
        default=1024, metadata=spec("data", "Largest bucket side in pixels.", minimum=64, maximum=8192)
    )
    bucket_reso_steps: int = field(
        default=64,
        metadata=spec("data", "Bucket sides are multiples of this (must be a multiple of 8).", minimum=8, maximum=1024),
    )

    # --- data: augmentation, regularization images, masks (issue 18) ---------------------------
    flip_aug: bool = field(
        default=False,
        metadata=spec(
            "data",
            "Train each image mirrored left-right half the time: both orientations are cached, and each epoch's "
            "plan picks one per image. Not for subjects whose sides differ (text, asymmetric logos).",
        ),
    )
    random_crop: bool = field(
        default=False,
        metadata=spec(
            "data",
            "Crop each sample at a random offset (in 8-pixel latent steps) instead of the centre, where the image "
            "is larger than its bucket. The whole image's latents are cached and cropped each step.",
        ),
    )
    caption_tag_dropout_rate: float = field(
        default=0.0,
        metadata=spec(
            "data",
            "Probability of dropping each comma-separated tag of a caption (the kept tokens and the trigger "
            "word never are).",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    keep_tokens_separator: str = field(
        default="",
        metadata=spec(
            "data",
            'A marker such as "|||" in captions: tags before it stay first and in place (instead of keep_tokens); '
            "the marker itself is removed from the caption.",
        ),
    )
    reg_data_dir: Path | None = field(
        default=None,
        metadata=spec(
            "data",
            "Regularization images (DreamBooth prior preservation): a folder of class images, captioned like "
            "train_data_dir or by their kohya folder name (`1_dog` → dog). Each epoch uses as many reg samples "
            "as training samples (repeated or cut as kohya does).",
            example="./data/reg_dog",
        ),
    )
    prior_loss_weight: float = field(
        default=1.0,
        metadata=spec("data", "Weight of the regularization images' loss.", minimum=0.0, maximum=100.0),
    )
    masked_loss: bool = field(
        default=False,
        metadata=spec(
            "data",
            "Weight the loss by a mask per image: from mask_dir when set, else the image's alpha channel "
            "(opaque = trained, transparent = ignored). Images without a mask are trained everywhere.",
        ),
    )
    mask_dir: Path | None = field(
        default=None,
        metadata=spec(
            "data",
            "With masked_loss: a folder of greyscale masks named like the images (relative path and stem; any "
            "image extension); white = trained, black = ignored.",
            example="./data/style_masks",
        ),
    )

    # --- samples ------------------------------------------------------------------------------
    sample_prompts: SamplePrompts = field(
        default_factory=SamplePrompts,
        metadata=spec(
            "samples",
            "Prompts drawn while training (sample_every_n_steps, sample_every_n_epochs, sample_at_first) into "
            "output_dir/samples/, as PNGs A1111's PNG Info reads: a list, or a kohya prompt file (.txt, one prompt "
            "a line with --n negative, --w/--h size, --d seed, --s steps, --l CFG, --g guidance, --ss sampler; or "
            ".yaml/.json). [trigger] in a prompt becomes trigger_word.",
            example=["a photo of [trigger], studio light --w 512 --h 512 --d 1"],
        ),
    )
    sample_sampler: str = field(
        default="euler_a",
        metadata=spec(
            "samples",
            "Sampler of the sample images (a prompt's --ss overrides it): euler, euler_a, dpm++_2m, "
            "dpm++_2m_karras, ddim; flow_match_euler for flow-matching models (Flux).",
            choices=SAMPLER_CHOICES,
        ),
    )
    sample_steps: int = field(
        default=20,
        metadata=spec("samples", "Denoising steps per sample image (--s).", minimum=1, maximum=MAX_SAMPLE_STEPS),
    )
    sample_cfg_scale: float = field(
        default=7.0,
        metadata=spec("samples", "Classifier-free guidance scale of the samples (--l).", minimum=0.0, maximum=MAX_CFG),
    )
    sample_width: int | None = field(
        default=None,
        metadata=spec(
            "samples",
            "Width of the samples in pixels (--w), a multiple of 8. Unset: resolution.",
            minimum=64,
            maximum=MAX_SAMPLE_SIDE,
        ),
    )
    sample_height: int | None = field(
        default=None,
        metadata=spec(
            "samples",
            "Height of the samples in pixels (--h), a multiple of 8. Unset: resolution.",
            minimum=64,
            maximum=MAX_SAMPLE_SIDE,
        ),
    )

    # --- model --------------------------------------------------------------------------------
    model_config_dir: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "A diffusers-layout folder whose configs (and tokenizer/) describe a single-file "
            "base_model. Unset: lorad's built-in SD1.x/SD2.x configs.",
        ),
    )
    tokenizer_path: Path | None = field(
        default=None,
        metadata=spec(
            "model",
            "Folder with the CLIP tokenizer for a single-file base_model. Unset: looked up in "
            "model_config_dir, then the local Hugging Face cache.",
        ),
    )
    prediction_type: str = field(
        default="auto",
        metadata=spec(
            "model",
            "What the UNet predicts. auto: from the model (SD2.x single files: v_prediction).",
            choices=("auto", "epsilon", "v_prediction"),
        ),
    )

    # --- lora ---------------------------------------------------------------------------------
    unet_target_modules: tuple[str, ...] = field(
        # kohya's default (networks.lora: every Linear and 1x1 conv of the Transformer2DModel blocks),
        # so a kohya user gets the same LoRA at the same rank.
        default=("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        metadata=spec(
            "lora",
            "UNet layers that get LoRA, by diffusers leaf name (to_q, to_k, to_v, to_out.0, "
            "proj_in, proj_out, ff.net.0.proj, ff.net.2, ...) or the aliases q_proj/k_proj/v_proj/"
            "out_proj. A longer suffix such as attn2.to_k narrows the match. The default is kohya's: "
            "every linear layer of the transformer blocks.",
        ),
    )
    train_text_encoder: bool = field(
        default=False,
        metadata=spec("lora", "Also train a LoRA on the text encoder (stronger, more prone to overfitting)."),
    )
    text_encoder_target_modules: tuple[str, ...] = field(
        # kohya's default too: the attention and MLP layers of every CLIP encoder layer.
        default=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        metadata=spec(
            "lora",
            "Text-encoder layers that get LoRA (CLIP names: q_proj, k_proj, v_proj, out_proj, fc1, fc2; "
            "the default is kohya's: all of them).",
        ),
    )
    text_encoder_lr: float | None = field(
        default=None,
        metadata=spec(
            "lora",
            "Learning rate of the text-encoder LoRA. Unset: learning_rate.",
            minimum=0.0,
            maximum=MAX_LEARNING_RATE,
            exclusive_minimum=True,
        ),
    )
    init_lora: Path | None = field(
        default=None,
        metadata=spec(
            "lora",
            "Start from an existing LoRA file (kohya .safetensors written by lorad, kohya or "
            "diffusers) instead of zeros: incremental training. Its rank must equal lora_rank.",
        ),
    )

    # --- lora: network types (issue 18) ---------------------------------------------------------
    network_type: str = field(
        default="lora",
        metadata=spec(
            "lora",
            "lora: plain LoRA (PEFT) on the target layers. locon: LoRA on the target layers and on the UNet's ResNet "
            "and up/down-sampler convolutions (3x3 ones at conv_dim). loha, lokr: LyCORIS' Hadamard and Kronecker "
            "products (fewer parameters for the same rank). dora: LoRA with weight decomposition (a learned "
            "magnitude per input channel, as A1111 applies it). All but lora are LyCORIS files A1111, Forge and "
            "ComfyUI load (ss_network_module lycoris.kohya); diffusers also loads lora and locon.",
            choices=("lora", "locon", "loha", "lokr", "dora"),
        ),
    )
    conv_dim: int | None = field(
        default=None,
        metadata=spec(
            "lora",
            "Rank of the adapters on 3x3 convolutions (kohya's conv_dim). locon: unset means lora_rank; loha, lokr, "
            "dora: setting it adds the ResNet convolutions, as locon does. Not for network_type lora.",
            minimum=1,
            maximum=1024,
        ),
    )
    conv_alpha: float | None = field(
        default=None,
        metadata=spec(
            "lora",
            "Alpha of the 3x3 convolution adapters (scaled by conv_alpha/conv_dim). Unset: equal to conv_dim.",
            minimum=0.0,
            maximum=MAX_ALPHA,
            exclusive_minimum=True,
        ),
    )
    rank_dropout: float = field(
        default=0.0,
        metadata=spec(
            "lora",
            "LyCORIS networks (not lora): probability of dropping each rank (locon, dora) or each output row of "
            "the update (loha, lokr) in a training step.",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    module_dropout: float = field(
        default=0.0,
        metadata=spec(
            "lora",
            "LyCORIS networks (not lora): probability of skipping a layer's whole adapter in a training step.",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    # --- training -----------------------------------------------------------------------------
    noise_offset: float = field(
        default=0.0,
        metadata=spec(
            "training", "Noise offset (0.05-0.1 helps very dark/bright images); 0 disables.", minimum=0.0, maximum=1.0
        ),
    )
    min_snr_gamma: float | None = field(
        default=None,
        metadata=spec(
            "training",
            "Min-SNR loss weighting gamma (5 is the paper's value); unset disables.",
            minimum=0.0,
            maximum=1000.0,
            exclusive_minimum=True,
        ),
    )
    # --- training: text encoder and noise options (issue 18) ------------------------------------
    clip_skip: int | None = field(
        default=None,
        metadata=spec(
            "training",
            "Use the text encoder's N-th hidden state from the end (2 = the penultimate layer, as anime SD1 "
            "checkpoints are trained and used), with the final layer norm applied. Unset or 1: the last layer.",
            minimum=1,
            maximum=12,
        ),
    )
    multires_noise_iterations: int = field(
        default=0,
        metadata=spec(
            "training",
            "Multi-resolution (pyramid) noise: this many coarser noise levels are added (6-10 is typical); 0 disables.",
            minimum=0,
            maximum=64,
        ),
    )
    multires_noise_discount: float = field(
        default=0.3,
        metadata=spec(
            "training", "Multi-resolution noise: weight factor of each coarser level.", minimum=0.0, maximum=1.0
        ),
    )
    ip_noise_gamma: float = field(
        default=0.0,
        metadata=spec(
            "training",
            "Input perturbation: extra noise of this strength in the model's input only (0.1 is typical); 0 disables.",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    min_timestep: int = field(
        default=0,
        metadata=spec("training", "Lowest diffusion timestep trained (inclusive).", minimum=0, maximum=999),
    )
    max_timestep: int = field(
        default=1000,
        metadata=spec("training", "Highest diffusion timestep trained (exclusive).", minimum=1, maximum=1000),
    )
    cache_dir: Path | None = field(
        default=None,
        metadata=spec(
            "training",
            "Where VAE latents (by image content) and text-encoder outputs (by caption, in text/) are cached, so a "
            "re-run encodes nothing. Unset: the lorad cache folder ($LORAD_HOME/cache).",
        ),
    )
    cache_text_encoder_outputs: bool = field(
        default=True,
        metadata=spec(
            "training",
            "When the text encoder is not trained: encode every caption the run will use once, before the first "
            "step (kept in cache_dir), and move the text encoder off the GPU until the run ends. With "
            "shuffle_caption or caption_dropout every distinct caption string of the run is one entry "
            "(the data report says how many). false: run the text encoder at every step.",
        ),
    )

    @property
    def effective_conv_dim(self) -> int | None:
        """The rank of 3x3 convolution adapters, or None when convolutions get none."""
        if self.network_type == "locon":
            return self.conv_dim or self.lora_rank
        return self.conv_dim if self.network_type != "lora" else None

    @property
    def effective_conv_alpha(self) -> float:
        """conv_alpha, or the conv rank when unset."""
        return float(self.conv_alpha or self.effective_conv_dim or self.lora_rank)

    @property
    def effective_text_encoder_lr(self) -> float:
        """text_encoder_lr, or learning_rate when unset."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr


REQUIRED_KEYS = ("train_data_dir", "base_model", "output_dir")


def config_to_dict(config: Any, *, mappings: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass as JSON-friendly YAML keys: paths as strings, tuples as lists, ``mappings``
    (tuples of pairs) as dicts, a RepeatPolicy in its YAML spelling."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif f.name in mappings:
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, (RepeatPolicy, OptimizerArgs, DeviceRequest, SamplePrompts)):
            value = value.to_yaml()
        out[f.name] = value
    return out


def key_specs(config_class: type = TrainConfig) -> Mapping[str, dict[str, Any]]:
    """Every key of a config class and its metadata, in declaration order."""
    return {f.name: dict(f.metadata) for f in fields(config_class)}


def redefault(base: type, name: str, default: Any, *, help: str | None = None) -> Any:
    """A family's re-declaration of a shared key ``name`` of ``base`` with its own ``default`` (and,
    where the shared wording does not fit, its own ``help``); the key's other metadata stays shared.

    Use it as a field in the family's config class: ``epochs: int = redefault(TrainingKeys, "epochs", 3)``.
    """
    shared = next(f for f in fields(base) if f.name == name)
    metadata = dict(shared.metadata) | ({"help": help} if help else {})
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"{name}: use a tuple or a frozen value as a default")  # a bug in a family, not user input
    return field(default=default, metadata=metadata)
