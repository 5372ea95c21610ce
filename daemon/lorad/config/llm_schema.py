"""The LLM training config: every key, its type, default and help text (``task: llm``).

:class:`LlmTrainConfig` is the typed, frozen object the LLM engine sees; it is built only by
:func:`lorad.config.llm_loader.parse_llm_config`, which validates every key at once. Same YAML
style, same ``spec`` metadata and the same section names as the Stable Diffusion config
(:mod:`lorad.config.schema`); the few shared keys are repeated here on purpose, so each config
reads on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.config.schema import (
    MAX_ACCUMULATION,
    MAX_ALPHA,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_GRAD_NORM,
    MAX_KEPT_CHECKPOINTS,
    MAX_LEARNING_RATE,
    MAX_SEED,
    MAX_STEPS,
    MAX_WEIGHT_DECAY,
    config_to_dict,
    spec,
)

# `target_modules` presets: names every Llama/Mistral/Qwen-style model uses.
TARGET_PRESETS: Mapping[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
TEMPLATE_NAMES = ("tokenizer", "chatml", "llama2", "alpaca")


@dataclass(frozen=True)
class LlmTrainConfig:
    """A validated LLM (causal language model) LoRA training config. All paths are absolute."""

    # --- data -------------------------------------------------------------------------------
    train_data: Path = field(
        metadata=spec(
            "data",
            "Training records: a .jsonl, .json, .csv (or .parquet with pyarrow) file, or a folder of them. "
            "Shapes: alpaca (instruction, input, output, system), chat (messages: [{role, content}]), ShareGPT "
            "(conversations: [{from, value}]) or plain text (text).",
            example="./data/records.jsonl",
        )
    )
    data_format: str = field(
        default="auto", metadata=spec("data", "The rows' shape. auto: from each row's fields.", choices=DATA_FORMATS)
    )
    columns: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=spec(
            "data",
            "Rename fields: {lorad name: your column}, e.g. {instruction: question, output: answer, "
            "messages: dialog, role: speaker, content: text}.",
            example={"instruction": "question"},
        ),
    )
    roles: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=spec(
            "data",
            "Map speaker names to system/user/assistant, e.g. {doctor: assistant, patient: user}. "
            "ShareGPT's human/gpt are known already.",
        ),
    )
    eval_data: Path | None = field(
        default=None, metadata=spec("data", "A separate file (or folder) of eval records; eval loss is reported on it.")
    )
    eval_fraction: float = field(
        default=0.0,
        metadata=spec(
            "data",
            "Hold out this fraction of train_data for eval loss when eval_data is unset; 0 disables.",
            minimum=0.0,
            maximum=0.5,
        ),
    )
    max_seq_len: int = field(
        default=1024,
        metadata=spec(
            "data",
            "Tokens per sample; longer samples are cut (the data report says how many).",
            minimum=8,
            maximum=131_072,
        ),
    )
    packing: bool = field(
        default=False,
        metadata=spec(
            "data",
            "Pack several samples into each max_seq_len row (faster on short samples); samples never "
            "attend to each other.",
        ),
    )
    chat_template: str = field(
        default="tokenizer",
        metadata=spec(
            "data",
            "How conversations become text: the tokenizer's own template, a named one (chatml, llama2, "
            "alpaca), or Jinja text. Saved with the adapter so use matches training.",
        ),
    )

    # --- model ------------------------------------------------------------------------------
    task: str = field(
        default="llm",
        metadata=spec(
            "model",
            "What to train. Unset: llm when base_model's config.json names a causal-LM architecture.",
            choices=("llm",),
        ),
    )
    base_model: str = field(
        default="",
        metadata=spec(
            "model",
            "A causal language model: a folder with config.json and safetensors weights, or a hub id already "
            "in the local Hugging Face cache (nothing is downloaded).",
            example="./models/Llama-2-7b-hf",
        ),
    )
    tokenizer_path: Path | None = field(
        default=None, metadata=spec("model", "A tokenizer folder. Unset: the base model's own tokenizer.")
    )
    allow_pickle: bool = field(
        default=False,
        metadata=spec(
            "model",
            "Allow a base model whose weights exist only as pytorch_model.bin (a pickle, read with "
            "torch.load(weights_only=True)). Prefer safetensors.",
        ),
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=spec("model", "QLoRA: load the frozen base in 4-bit NF4 (needs bitsandbytes and a CUDA GPU)."),
    )

    # --- lora -------------------------------------------------------------------------------
    lora_rank: int = field(default=8, metadata=spec("lora", "LoRA rank (r). 8-64 is typical.", minimum=1, maximum=1024))
    lora_alpha: float | None = field(
        default=None,
        metadata=spec(
            "lora",
            "LoRA alpha; the update is scaled by alpha/rank (alpha/sqrt(rank) with use_rslora). Unset: 2 x lora_rank.",
            minimum=0.0,
            maximum=MAX_ALPHA,
            exclusive_minimum=True,
        ),
    )
    lora_dropout: float = field(
        default=0.05, metadata=spec("lora", "Dropout on the LoRA path during training.", minimum=0.0, maximum=1.0)
    )
    target_modules: tuple[str, ...] = field(
        default=("all-linear",),
        metadata=spec(
            "lora",
            "Layers that get LoRA: leaf names (q_proj, v_proj, ...) or a preset: all-linear (attention and "
            "MLP projections), attention (q/k/v/o).",
        ),
    )
    use_rslora: bool = field(
        default=False,
        metadata=spec(
            "lora",
            "Rank-stabilised LoRA (scale alpha/sqrt(rank)); some servers ignore it (see the summary's "
            "compatibility check).",
        ),
    )
    use_dora: bool = field(
        default=False,
        metadata=spec("lora", "DoRA (weight-decomposed LoRA): often better at low rank, not loadable by every server."),
    )
    init_adapter: Path | None = field(
        default=None,
        metadata=spec(
            "lora",
            "Continue training an existing PEFT adapter folder (a new run starting from its weights; its "
            "rank and target layers are used). Not the same as resume_from.",
        ),
    )

    # --- training ---------------------------------------------------------------------------
    batch_size: int = field(
        default=4,
        metadata=spec("training", "Samples (packed rows with packing) per step.", minimum=1, maximum=MAX_BATCH),
    )
    epochs: int = field(default=3, metadata=spec("training", "Passes over the data.", minimum=1, maximum=MAX_EPOCHS))
    max_train_steps: int | None = field(
        default=None,
        metadata=spec(
            "training", "Stop after this many optimizer steps; overrides epochs.", minimum=1, maximum=MAX_STEPS
        ),
    )
    learning_rate: float = field(
        default=2e-4,
        metadata=spec(
            "training",
            "Learning rate of the LoRA weights.",
            minimum=0.0,
            maximum=MAX_LEARNING_RATE,
            exclusive_minimum=True,
        ),
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=spec(
            "training",
            "Micro-batches whose gradients are summed per optimizer step.",
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
            "training", "adamw, or adamw8bit (needs bitsandbytes and a CUDA GPU).", choices=("adamw", "adamw8bit")
        ),
    )
    weight_decay: float = field(
        default=0.0, metadata=spec("training", "AdamW weight decay.", minimum=0.0, maximum=MAX_WEIGHT_DECAY)
    )
    lr_scheduler: str = field(
        default="cosine",
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
    mixed_precision: str = field(
        default="auto",
        metadata=spec(
            "training",
            "auto: bf16 on GPUs that support it, else fp16 on CUDA, no (fp32) on CPU.",
            choices=("auto", "no", "fp16", "bf16"),
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=spec("training", "Recompute activations in the backward pass: much less memory, ~20-30% slower."),
    )
    eval_steps: int | None = field(
        default=None,
        metadata=spec(
            "training",
            "Compute eval loss every N steps (and at the end). Unset: only at the end.",
            minimum=1,
            maximum=MAX_STEPS,
        ),
    )
    seed: int = field(
        default=42,
        metadata=spec(
            "training",
            "Random seed; the same seed and data give the same adapter on CPU.",
            minimum=0,
            maximum=MAX_SEED,
        ),
    )
    device: str = field(
        default="auto",
        metadata=spec("training", "Where to train: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."),
    )

    # --- checkpoints ------------------------------------------------------------------------
    save_steps: int | None = field(
        default=None,
        metadata=spec(
            "checkpoints",
            "Save a resumable checkpoint every N optimizer steps; unset disables.",
            minimum=1,
            maximum=MAX_STEPS,
        ),
    )
    keep_checkpoints: int = field(
        default=3,
        metadata=spec(
            "checkpoints", "How many of the newest checkpoints to keep.", minimum=1, maximum=MAX_KEPT_CHECKPOINTS
        ),
    )
    resume_from: Path | None = field(
        default=None,
        metadata=spec(
            "checkpoints",
            "Continue THIS run exactly where it stopped: output_dir/checkpoints/step-N or `latest` "
            "(optimizer, schedule and data order included). To train an existing adapter further, use init_adapter.",
        ),
    )

    # --- output -----------------------------------------------------------------------------
    output_dir: Path = field(
        default=Path("output"),
        metadata=spec(
            "output",
            "Folder for the adapter, checkpoints, logs and training_summary.json.",
            example="./output/medical_terms",
        ),
    )
    output_name: str = field(
        default="",
        metadata=spec(
            "output", "Name of the run (job lists, the adapter's folder name). Unset: output_dir's folder name."
        ),
    )
    save_precision: str = field(
        default="fp32",
        metadata=spec("output", "Precision of the saved adapter weights.", choices=("fp16", "bf16", "fp32")),
    )
    merge_export: bool = field(
        default=False,
        metadata=spec(
            "output",
            "Also write the base model with the adapter merged in (safetensors + tokenizer) to "
            "output_dir/merged, loadable with AutoModelForCausalLM.from_pretrained.",
        ),
    )
    sample_prompts: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "output",
            "User messages answered with the trained adapter at the end; the answers go in the job "
            "events and training_summary.json.",
            example=["What does COPD stand for?"],
        ),
    )
    sample_max_new_tokens: int = field(
        default=64,
        metadata=spec(
            "output", "Longest answer generated per sample prompt (greedy decoding).", minimum=1, maximum=4096
        ),
    )

    @property
    def effective_lora_alpha(self) -> float:
        """lora_alpha, or 2 x lora_rank when unset (the common LLM default)."""
        return float(2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def target_module_names(self) -> tuple[str, ...]:
        """target_modules with presets expanded, in order, without duplicates."""
        names = [n for item in self.target_modules for n in TARGET_PRESETS.get(item, (item,))]
        return tuple(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (paths as strings), in the same keys the YAML uses."""
        return config_to_dict(self, mappings=("columns", "roles"))


LLM_REQUIRED_KEYS = ("train_data", "base_model", "output_dir")
