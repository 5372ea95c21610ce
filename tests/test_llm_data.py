"""LLM text data: the three shapes in every file type, bad rows with lines, label masking, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorad.errors import DataError
from lorad.textdata.batches import collate, pack_rows
from lorad.textdata.dataset import encode_samples, read_samples
from lorad.textdata.encoding import IGNORE, encode_sample
from lorad.textdata.shapes import Message, Sample
from lorad.textdata.templates import NAMED_TEMPLATES
from tests.support.datasets import write_jsonl

NO_MAPPING = {"data_format": "auto", "columns": {}, "roles": {}}


@pytest.fixture(scope="module")
def tokenizer(tiny_llm: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm)


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])


def masked_text(tokenizer, encoded) -> str:
    return tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE])


def label_runs(encoded) -> int:
    """How many separate stretches of trained tokens there are."""
    flags = [label != IGNORE for label in encoded.labels]
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def test_alpaca_labels_cover_exactly_the_response_and_eos(tokenizer) -> None:
    sample = Sample(
        where="x:1",
        shape="alpaca",
        messages=(
            Message("system", "You are careful."),
            Message("user", "Expand COPD\n\nin one line"),
            Message("assistant", "chronic obstructive pulmonary disease"),
        ),
    )
    encoded = encode_sample(sample, tokenizer, max_seq_len=256)
    assert trained_text(tokenizer, encoded) == "chronic obstructive pulmonary disease</s>"
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in sample.messages[:2]],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert masked_text(tokenizer, encoded) == prompt
    # Where the labels are set, they are the token itself (the model shifts them).
    assert all(label in (IGNORE, token) for token, label in zip(encoded.input_ids, encoded.labels, strict=True))
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_multi_turn_chat_trains_on_every_reply_only_even_when_the_prompt_repeats_it(tokenizer) -> None:
    sample = Sample(
        where="x:1",
        shape="chat",
        messages=(
            Message("user", "say hello world"),
            Message("assistant", "hello world"),
            Message("user", "again: one two three"),
            Message("assistant", "one two three"),
        ),
    )
    encoded = encode_sample(sample, tokenizer, max_seq_len=256)
    assert label_runs(encoded) == 2
    assert trained_text(tokenizer, encoded) == "hello world</s>one two three</s>"
    assert "say hello world" in masked_text(tokenizer, encoded)


@pytest.mark.parametrize("template", ["chatml", "llama2", "alpaca"])
def test_named_templates_mask_the_prompt_and_end_replies_with_eos(tokenizer, template: str) -> None:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NAMED_TEMPLATES[template]
    sample = Sample(
        where="x:1",
        shape="chat",
        messages=(
            Message("user", "red green"),
            Message("assistant", "blue yellow"),
            Message("user", "one two"),
            Message("assistant", "three four"),
        ),
    )
    encoded = encode_sample(sample, tok, max_seq_len=256)
    assert label_runs(encoded) == 2
    assert trained_text(tok, encoded).replace(" ", "") == "blueyellow</s>threefour</s>"


def test_plain_text_trains_on_everything_after_the_first_token_and_ends_with_eos(tokenizer) -> None:
    encoded = encode_sample(Sample(where="x:1", shape="text", text="hello world"), tokenizer, max_seq_len=64)
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.labels[0] == IGNORE and list(encoded.labels[1:]) == list(encoded.input_ids[1:])


def test_every_shape_and_file_type_reads(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", [{"instruction": "add", "input": "2 and 3", "output": "5"}])
    (folder / "b.json").write_text(
        json.dumps(
            [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            ],
            indent=2,
        )
    )
    (folder / "c.csv").write_text('text\n"plain text\nover two lines"\nsecond row\n')
    found = read_samples(folder, **NO_MAPPING)
    assert dict(found.shapes) == {"alpaca": 1, "chat": 1, "sharegpt": 1, "text": 2}
    assert not found.bad_rows
    assert [s.where for s in found.samples] == ["a.jsonl:1", "b.json:2", "b.json:14", "c.csv:2", "c.csv:4"]


def test_columns_and_roles_are_mapped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nwhat is COPD?,a lung disease\n")
    (sample,) = read_samples(
        path, data_format="auto", columns={"instruction": "question", "output": "answer"}, roles={}
    ).samples
    assert [m.content for m in sample.messages] == ["what is COPD?", "a lung disease"]
    write_jsonl(
        tmp_path / "e.jsonl",
        [{"dialog": [{"speaker": "patient", "text": "it hurts"}, {"speaker": "doctor", "text": "where?"}]}],
    )
    (chat,) = read_samples(
        tmp_path / "e.jsonl",
        data_format="chat",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"patient": "user", "doctor": "assistant"},
    ).samples
    assert [m.role for m in chat.messages] == ["user", "assistant"]


def test_bad_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "fine", "output": "ok"}),
                "{not json",
                json.dumps({"instruction": "no output"}),
                json.dumps({"instruction": "typed", "output": 5}),
                "",
                json.dumps({"text": "   "}),
                json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
                json.dumps({"conversations": [{"from": "narrator", "value": "x"}]}),
                json.dumps([1, 2]),
            ]
        )
        + "\n"
    )
    found = read_samples(path, **NO_MAPPING)
    assert len(found.samples) == 1
    rendered = [b.render() for b in found.bad_rows]
    assert [r.split(": ")[0] for r in rendered] == [f"records.jsonl:{n}" for n in (2, 3, 4, 6, 7, 8, 9)]
    assert "invalid JSON" in rendered[0] and "missing field `output`" in rendered[1]
    assert "`output` must be text" in rendered[2] and "`text` is empty" in rendered[3]
    assert "no assistant turn" in rendered[4] and "narrator" in rendered[5]


def test_a_file_with_nothing_usable_fails_listing_its_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        read_samples(tmp_path / "empty.jsonl", **NO_MAPPING)
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}, {"output": "y"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field `output`[\s\S]*bad.jsonl:2"):
        read_samples(tmp_path / "bad.jsonl", **NO_MAPPING)


def test_truncation_is_counted_and_reported(tmp_path: Path, tokenizer) -> None:
    write_jsonl(
        tmp_path / "t.jsonl", [{"text": "one two three four five six seven eight nine ten " * 3}, {"text": "red"}]
    )
    found = read_samples(tmp_path / "t.jsonl", **NO_MAPPING)
    data = encode_samples(found, [], list(found.samples), tokenizer, max_seq_len=12)
    assert data.report["truncated"] == 1 and data.report["longest_tokens"] > 12
    assert all(len(e.input_ids) <= 12 for e in data.train)
    assert "1 sample(s) longer than max_seq_len=12 were cut" in data.render()


def test_padding_with_eos_keeps_the_real_eos_labels(tokenizer) -> None:
    short = encode_sample(Sample(where="x:1", shape="text", text="red"), tokenizer, max_seq_len=64)
    long = encode_sample(Sample(where="x:2", shape="text", text="red green blue yellow"), tokenizer, max_seq_len=64)
    batch = collate([short, long], [[0], [1]], pad_id=tokenizer.eos_token_id, packed=False)
    n = len(short.input_ids)
    assert batch.labels[0, n - 1] == tokenizer.eos_token_id  # the sample's own EOS is trained on
    assert (batch.labels[0, n:] == IGNORE).all() and (batch.attention_mask[0, n:] == 0).all()


def test_packed_samples_do_not_see_each_other(tiny_llm: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    samples = [
        encode_sample(Sample(where=f"x:{i}", shape="text", text=t), tokenizer, max_seq_len=64)
        for i, t in enumerate(["red green blue", "one two three four", "hello world"])
    ]
    rows = pack_rows(samples, [0, 1, 2], max_seq_len=64)
    assert rows == [[0, 1, 2]]
    packed = collate(samples, rows, pad_id=0, packed=True)
    with torch.no_grad():
        logits = model(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
        ).logits[0]
        at = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample.input_ids])).logits[0]
            n = len(sample.input_ids)
            torch.testing.assert_close(logits[at : at + n], alone, atol=1e-5, rtol=1e-5)
            at += n
    assert (packed.labels[0, len(samples[0].input_ids)] == IGNORE).item()  # no label across the seam


def test_parquet_reads_with_pyarrow_and_says_what_is_missing_without(tmp_path: Path) -> None:
    import importlib.util

    path = tmp_path / "records.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs the pyarrow package"):
            read_samples(path, **NO_MAPPING)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["q", ""], "output": ["a", "b"]}), path)
    found = read_samples(path, **NO_MAPPING)
    assert len(found.samples) == 1 and found.bad_rows[0].render() == "records.parquet:2: `instruction` is empty"


def test_conversations_the_template_refuses_become_bad_rows(tmp_path: Path, tokenizer) -> None:
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + tokenizer.chat_template
    )
    write_jsonl(
        tmp_path / "c.jsonl",
        [{"instruction": "q", "output": "a", "system": "be brief"}, {"instruction": "q", "output": "a"}],
    )
    found = read_samples(tmp_path / "c.jsonl", **NO_MAPPING)
    data = encode_samples(found, [], list(found.samples), strict, max_seq_len=64)
    assert len(data.train) == 1
    assert data.report["bad_rows"] == ["c.jsonl:1: the chat template refused it (no system role)"]
    only_refused = read_samples(tmp_path / "c.jsonl", **NO_MAPPING).samples[:1]
    with pytest.raises(DataError, match="refused every training sample"):
        encode_samples(found, [], list(only_refused), strict, max_seq_len=64)


def test_the_first_reply_token_is_trained_when_the_tokenizer_folds_the_space_into_it() -> None:
    """A SentencePiece-style tokenizer ("▁Hello" starts at the space before it) with a template whose
    prompt ends in a space ("ASSISTANT: "): the reply's first token begins one character before the
    reply and must still be trained on, or the model never learns how to start its answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace()
    words.decoder = decoders.Metaspace()
    words.train_from_iterator(
        ["USER: what is copd ASSISTANT: chronic obstructive pulmonary disease"] * 4,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} {% else %}"
        "ASSISTANT: {{ m.content }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    sample = Sample(
        where="x.jsonl:1",
        shape="chat",
        messages=(Message("user", "what is copd"), Message("assistant", "chronic obstructive pulmonary disease")),
    )
    encoded = encode_sample(sample, tokenizer, max_seq_len=64)
    trained = [
        tokenizer.convert_ids_to_tokens(t)
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
        if label != IGNORE
    ]
    assert trained[0].lstrip("▁") == "chronic" and trained[0].startswith("▁")  # the space is folded in
    assert tokenizer.convert_tokens_to_string(trained).strip() == "chronic obstructive pulmonary disease</s>"
