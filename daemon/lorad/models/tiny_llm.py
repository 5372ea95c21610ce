"""A tiny random Llama (``LlamaForCausalLM``) with a tokenizer trained locally, for tests and the demo.

The folder it writes looks like any Hugging Face causal-LM checkpoint: ``config.json`` naming
``LlamaForCausalLM``, ``model.safetensors``, and a fast tokenizer (``tokenizer.json``) with BOS
``<s>``, EOS ``</s>``, UNK ``<unk>``, **no pad token** (like Llama 2's) and a chat template that
uses the special tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Sizes: vocabulary of a few
hundred byte-level BPE tokens, hidden size 32, 2 layers, 4 heads (2 key/value heads), 256 positions.

Built offline in about a second; the same ``seed`` gives the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorad.atomic import atomic_directory

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Assistant-style sentences about clinical notes (the LLM demo's subject); enough for a few hundred merges.
CORPUS = (
    "The patient was admitted with shortness of breath and a persistent cough.",
    "Summarise the discharge note in plain language for the family.",
    "Hypertension is treated with lifestyle changes and medication such as lisinopril.",
    "The chest radiograph shows no acute cardiopulmonary abnormality.",
    "Type 2 diabetes mellitus, well controlled on metformin, HbA1c 6.8 percent.",
    "What does the abbreviation COPD stand for? Chronic obstructive pulmonary disease.",
    "Follow up in two weeks with the cardiology clinic.",
    "The patient denies fever, chills, nausea or vomiting.",
    "Answer the question using the record below.",
    "You are a careful clinical assistant. Use the correct medical terms.",
    "Atrial fibrillation with rapid ventricular response was converted with amiodarone.",
    "Allergies: penicillin (rash). Current medications: aspirin 81 mg daily.",
    "Translate the note into a short summary of three sentences.",
    "hello world, the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "red green blue yellow orange purple black white",
    "Question: what is the capital of France? Answer: Paris.",
    "Instruction: add the numbers. Input: 2 and 3. Output: 5.",
)


def train_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, with the chat template and no pad token."""
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def train_llama_style_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Like :func:`train_tokenizer`, but in Llama 2's tokenizer.json style: BPE over "▁"-joined words with
    byte fallback (``<0x00>``..``<0xFF>`` in the vocabulary). llama.cpp's converter reads this style
    (gguf's LlamaHfVocab); it refuses byte-level BPE tokenizers whose pre-tokenizer it has no hash for."""
    core = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, *ROLE_TOKENS], show_progress=False
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(core.to_str())["model"]
    specials = [UNK, BOS, EOS, *ROLE_TOKENS]
    pieces = specials + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    rebuilt = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=merges, unk_token=UNK, byte_fallback=True)
    )
    rebuilt.normalizer = core.normalizer
    rebuilt.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=rebuilt,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """The toy-width Llama architecture (real module names: q_proj, k_proj, ..., down_proj)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def build_tiny_llm(dest: Path, *, seed: int = 0, llama_style_tokenizer: bool = False) -> Path:
    """Write a tiny random Llama with its tokenizer into ``dest`` (atomically); return ``dest``.

    ``llama_style_tokenizer``: Llama 2's byte-fallback tokenizer style, which llama.cpp's converter reads.
    """
    tokenizer = train_llama_style_tokenizer() if llama_style_tokenizer else train_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return dest
