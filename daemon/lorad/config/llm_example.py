"""`lorad config --example llm`: the annotated LLM config, generated from :class:`LlmTrainConfig`."""

from __future__ import annotations

from lorad.config.example import render_annotated
from lorad.config.llm_schema import LlmTrainConfig

# The values a first-time user edits: a clinical-notes summariser on a local Llama.
_SEED = {
    "train_data": "./data/record_summaries.jsonl",
    "eval_fraction": 0.1,
    "max_seq_len": 1024,
    "model_family": "llm",
    "base_model": "./models/Llama-2-7b-chat-hf",
    "lora_rank": 16,
    "target_modules": ["all-linear"],
    "epochs": 3,
    "learning_rate": "2e-4",
    "gradient_checkpointing": True,
    "output_dir": "./output/medical_terms",
    "save_steps": 50,
    "sample_prompts": ["Summarise: pt admitted w/ SOB, hx of COPD, started on nebulised salbutamol."],
}
_TITLES = {
    "data": "Data: records, their shape, and how they become tokens",
    "model": "Base model (read from your disk; nothing is downloaded)",
}


def render_llm_example() -> str:
    """An annotated YAML LLM config listing every key with its help text, default and choices."""
    return render_annotated(LlmTrainConfig, _SEED, title="lorad LLM training config", titles=_TITLES)
