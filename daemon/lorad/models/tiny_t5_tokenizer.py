"""A tiny T5 tokenizer (SentencePiece-style Unigram), built locally with the ``tokenizers`` library.

It has the parts of T5's own tokenizer that matter to a model using it: a Unigram model over
``▁``-prefixed pieces (SentencePiece's Metaspace convention), ``<pad>`` = 0, ``</s>`` = 1 and
``<unk>`` = 2, and ``</s>`` appended to every sequence. The folder it writes (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) loads with transformers' ``T5TokenizerFast``
like the ``tokenizer_2/`` folder of a FLUX.1 diffusers model. Building is deterministic: the same
corpus gives byte-identical files (see :func:`seed_pieces` for how).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from lorad.atomic import write_text_atomic
from lorad.models.tiny_tokenizer import CORPUS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MAX_PIECE_LENGTH = 6
# T5 lowercases nothing; it folds runs of spaces like SentencePiece's nmt_nfkc rule.
_NORMALIZER = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])


def seed_pieces(corpus: tuple[str, ...] = CORPUS, max_length: int = MAX_PIECE_LENGTH) -> list[tuple[str, float]]:
    """SentencePiece's seed vocabulary for ``corpus``: its frequent substrings, scored by log frequency.

    Every substring (up to ``max_length`` characters) of every ``▁``-prefixed word that occurs at
    least twice, plus every single character; score = log(count / total). This is the vocabulary
    SentencePiece's Unigram training starts from, without the EM pruning that follows: ``tokenizers``'
    UnigramTrainer sums its EM statistics in hash-map order, so its pruned vocabulary differs from
    run to run, and a test model must not.
    """
    counts: Counter[str] = Counter()
    for text in corpus:
        for word in _NORMALIZER.normalize_str(text).split(" "):
            if not word:
                continue
            word = "▁" + word
            for start in range(len(word)):
                for stop in range(start + 1, min(len(word), start + max_length) + 1):
                    counts[word[start:stop]] += 1
    kept = {piece: n for piece, n in counts.items() if n >= 2 or len(piece) == 1}
    total = sum(kept.values())
    scored = [(piece, round(math.log(n / total), 6)) for piece, n in kept.items()]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def build_t5_tokenizer(corpus: tuple[str, ...] = CORPUS) -> Tokenizer:
    """A Unigram tokenizer over ``corpus``'s seed pieces, with T5's normalizer, pre-tokenizer and post-processor."""
    specials = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    tokenizer = Tokenizer(Unigram([*specials, *seed_pieces(corpus)], unk_id=2, byte_fallback=False))
    tokenizer.normalizer = _NORMALIZER
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens([PAD, EOS, UNK])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def write_tiny_t5_tokenizer(dest: Path, *, model_max_length: int = 512) -> int:
    """Train the tokenizer and write its folder at ``dest`` (created if missing); returns the vocabulary size."""
    tokenizer = build_t5_tokenizer()
    ids = {name: tokenizer.token_to_id(name) for name in (PAD, EOS, UNK)}
    if ids != {PAD: 0, EOS: 1, UNK: 2}:
        raise RuntimeError(f"special tokens got ids {ids}, T5 needs <pad>=0, </s>=1, <unk>=2")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dest / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    specials = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0, **specials}
    write_text_atomic(dest / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(dest / "special_tokens_map.json", json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return tokenizer.get_vocab_size()
