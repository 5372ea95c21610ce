"""Text data for LLM training: files in three shapes → masked token ids, with a report."""
