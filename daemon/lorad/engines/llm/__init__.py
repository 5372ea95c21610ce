"""LLM (causal language model) LoRA training: :func:`lorad.engines.llm.train.train_llm_lora`."""
