"""Causal language models (Llama, Mistral, Qwen, ...): a PEFT LoRA adapter."""
