"""The LLM training config: every key, its type, default and help text (``model_family: llm``).

:class:`LlmTrainConfig` is the typed, frozen object the LLM engine sees; it is built only by
:func:`lorad.config.llm_loader.parse_llm_config`, which validates every key at once. Same YAML
style, ``spec`` metadata and section names as the image families' configs; the keys every family
shares come from :class:`~lorad.config.schema.TrainingKeys`, some with the LLM's own defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.config.schema import MAX_STEPS, TrainingKeys, config_to_dict, redefault, spec

# `target_modules` presets: names every Llama/Mistral/Qwen-style model uses.
TARGET_PRESETS: Mapping[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
TEMPLATE_NAMES = ("tokenizer", "chatml", "llama2", "alpaca")


@dataclass(frozen=True, kw_only=True)
class LlmTrainConfig(TrainingKeys):
    """A validated LLM (causal language model) LoRA training config. All paths are absolute."""

    # --- shared keys with the LLM's defaults and wording ---------------------------------------
    base_model: str = redefault(
        TrainingKeys,
        "base_model",
        "",
        help="A causal language model: a folder with config.json and safetensors weights, or a hub id already "
        "in the local Hugging Face cache (nothing is downloaded).",
    )
    lora_alpha: float | None = redefault(
        TrainingKeys,
        "lora_alpha",
        None,
        help="LoRA alpha; the update is scaled by alpha/rank (alpha/sqrt(rank) with use_rslora). Unset: 2 x lora_rank.",
    )
    lora_dropout: float = redefault(TrainingKeys, "lora_dropout", 0.05)
    batch_size: int = redefault(TrainingKeys, "batch_size", 4)
    epochs: int = redefault(TrainingKeys, "epochs", 3, help="Passes over the data.")
    learning_rate: float = redefault(TrainingKeys, "learning_rate", 2e-4)
    weight_decay: float = redefault(TrainingKeys, "weight_decay", 0.0)
    lr_scheduler: str = redefault(TrainingKeys, "lr_scheduler", "cosine")
    resume_from: Path | None = redefault(
        TrainingKeys,
        "resume_from",
        None,
        help="Continue THIS run exactly where it stopped: output_dir/checkpoints/step-N or `latest` "
        "(optimizer, schedule and data order included). To train an existing adapter further, use init_adapter.",
    )
    output_dir: Path = redefault(
        TrainingKeys,
        "output_dir",
        Path("output"),
        help="Folder for the adapter, checkpoints, logs and training_summary.json.",
    )
    output_name: str = redefault(
        TrainingKeys,
        "output_name",
        "",
        help="Name of the run (job lists, the adapter's folder name). Unset: output_dir's folder name.",
    )
    save_precision: str = redefault(TrainingKeys, "save_precision", "fp32")

    # --- data ---------------------------------------------------------------------------------
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

    # --- model --------------------------------------------------------------------------------
    tokenizer_path: Path | None = field(
        default=None, metadata=spec("model", "A tokenizer folder. Unset: the base model's own tokenizer.")
    )
    allow_pickle: bool = redefault(
        TrainingKeys,
        "allow_pickle",
        False,
        help="Allow a base model whose weights exist only as pytorch_model.bin (a pickle, read with "
        "torch.load(weights_only=True)). Prefer safetensors.",
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=spec("model", "QLoRA: load the frozen base in 4-bit NF4 (needs bitsandbytes and a CUDA GPU)."),
    )

    # --- lora ---------------------------------------------------------------------------------
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

    # --- training -----------------------------------------------------------------------------
    eval_steps: int | None = field(
        default=None,
        metadata=spec(
            "training",
            "Compute eval loss every N steps (and at the end). Unset: only at the end.",
            minimum=1,
            maximum=MAX_STEPS,
        ),
    )

    # --- output -------------------------------------------------------------------------------
    merge_export: bool = field(
        default=False,
        metadata=spec(
            "output",
            "Also write the base model with the adapter merged in (safetensors + tokenizer) to "
            "output_dir/merged, loadable with AutoModelForCausalLM.from_pretrained.",
        ),
    )
    export_gguf: str | None = field(
        default=None,
        metadata=spec(
            "output",
            "At the end, also export the adapter (and, with merge_export, the merged model) as GGUF for llama.cpp, "
            "plus an Ollama Modelfile, into output_dir/gguf, at this quantization: f16, q8_0 or q4_k_m "
            "(same as `lorad export gguf`). Unset: no GGUF.",
            choices=("f16", "q8_0", "q4_k_m"),
        ),
    )
    sample_prompts: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            "samples",
            "User messages answered with the trained adapter at the end (and every sample_every_n_steps / "
            "sample_every_n_epochs, before training with sample_at_first); the answers go in the job events and "
            "training_summary.json.",
            example=["What does COPD stand for?"],
        ),
    )
    sample_max_new_tokens: int = field(
        default=64,
        metadata=spec(
            "samples", "Longest answer generated per sample prompt (greedy decoding).", minimum=1, maximum=4096
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
