"""LLM engine vs bare loop: tokens/s of lorad's LLM LoRA engine against a minimal transformers + peft loop.

Both sides train the same LoRA (all linear projections, rank 16, alpha 32, AdamW, grad clipping
1.0) on the same resident model object, in one process, alternating engine and bare runs so machine
noise hits both. The data is plain text cut to exactly ``--seq-len`` tokens per row, so every step
of either side trains ``batch x seq_len`` tokens. Each run skips ``--warmup-steps`` steps and times
the next ``--steps``; medians over ``--repeats`` runs give tokens/s and the time ratio engine/bare
(target <= 1.10).

Cases: ``tiny`` (lorad's tiny random Llama) and ``llama1b`` (TinyLlama-1.1B's architecture with random
weights: 22 layers, hidden 2048, 32 heads / 4 KV heads, vocabulary 32000; ~4.4 GB in fp32, 2.2 GB
in bf16), built in memory.

    python -m bench.llm_vs_bare --cases tiny llama1b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

TARGET_RATIO = 1.10
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANK, ALPHA, LR = 16, 32.0, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timed:
    """One side's timed window: wall and process-CPU seconds over ``steps`` steps, and the peak of
    allocated device memory in it (CUDA only)."""

    wall: float
    cpu: float
    steps: int
    peak_bytes: int | None


def mark(device: torch.device, *, start: bool) -> tuple[float, float]:
    """(wall, process CPU) clocks with the device's queued work done; the start mark also opens a
    fresh peak-memory window."""
    sync(device)
    if start and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter(), time.process_time()


def timed(device: torch.device, first: tuple[float, float], last: tuple[float, float], steps: int) -> Timed:
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Timed(last[0] - first[0], last[1] - first[1], steps, peak)


def build_model(case: str, tokenizer_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The case's model on ``device`` in ``dtype``, frozen; its config.json written beside the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorad.models.tiny_llm import tiny_llama_config

    if case == "tiny":
        config = tiny_llama_config(vocab_size=400)
    else:  # TinyLlama-1.1B's shape
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tokenizer_dir)  # lets the engine detect the task and read the tokenizer
    return model


def make_text(path: Path, rows: int) -> Path:
    """Plain-text rows long enough to fill any --seq-len (the tiny tokenizer makes ~1 token per word)."""
    words = [
        "the",
        "patient",
        "was",
        "admitted",
        "with",
        "shortness",
        "of",
        "breath",
        "and",
        "a",
        "persistent",
        "cough",
    ]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(1200)) for i in range(rows)]
    path.write_text(json.dumps([{"text": line} for line in lines]))
    return path


def run_engine(
    model: torch.nn.Module, base: Path, data: Path, out: Path, args: argparse.Namespace, precision: str
) -> Timed:
    """The engine's window: ``args.steps - 1`` steps after the warmup (it reports step k once step k+1
    is queued, so the marks at the reports of steps ``warmup`` and ``warmup + steps - 1`` fall at the
    ends of steps warmup+1 and warmup+steps)."""
    from lorad.config.llm_loader import parse_llm_config
    from lorad.events import Event, StepDone
    from lorad.families.llm.model import LlmModel
    from lorad.training.family import ProvidedModel
    from lorad.training.loop import train

    device = torch.device(args.device)
    config = parse_llm_config(
        {
            "train_data": str(data),
            "base_model": str(base),
            "output_dir": str(out),
            "max_seq_len": args.seq_len,
            "batch_size": args.batch,
            "max_train_steps": args.warmup_steps + args.steps,
            "lora_rank": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": 0.0,
            "learning_rate": LR,
            "lr_scheduler": "constant",
            "device": args.device,
            "mixed_precision": precision,
            "save_precision": "bf16",
        },
        base_dir=out.parent,
    )
    marks: dict[int, tuple[float, float]] = {}
    first, last = args.warmup_steps, args.warmup_steps + args.steps - 1

    @contextmanager
    def provide(config: Any, placement: Any) -> Iterator[ProvidedModel]:
        yield ProvidedModel(
            model=LlmModel(model=model, source="bench", model_version="llama"), resident=True, seconds=0
        )

    def on_event(event: Event) -> None:
        if isinstance(event, StepDone) and event.step in (first, last):
            marks[event.step] = mark(device, start=event.step == first)

    train(config, on_event=on_event, models=provide)
    return timed(device, marks[first], marks[last], args.steps - 1)


def run_bare(
    model: torch.nn.Module, tokenizer: Any, data: Path, args: argparse.Namespace, autocast_dtype: torch.dtype | None
) -> Timed:
    """``args.steps`` steps of the smallest honest loop after the warmup: tokenize, LoRA, AdamW, clip."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    device = torch.device(args.device)
    texts = [row["text"] for row in json.loads(data.read_text())]
    ids = [tokenizer(t)["input_ids"][: args.seq_len] for t in texts]
    torch.manual_seed(0)
    inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS), model, adapter_name="bench_bare"
    )
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)  # as the engine's
    model.train()
    model.config.use_cache = False
    try:
        start = mark(device, start=True)
        for step in range(args.warmup_steps + args.steps):
            at = (step * args.batch) % len(ids)
            batch = torch.tensor([ids[(at + i) % len(ids)] for i in range(args.batch)], device=device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 == args.warmup_steps:
                start = mark(device, start=True)  # no sync between timed steps: a minimal loop has no reason to
        end = mark(device, start=False)
    finally:
        for path, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_path, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_path) if parent_path else model, child, module.get_base_layer())
        model.eval()
        if hasattr(model, "peft_config"):
            del model.peft_config
    return timed(device, start, end, args.steps)


def bench_case(case: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from lorad.models.tiny_llm import train_tokenizer

    device = torch.device(args.device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype, precision = (torch.bfloat16, "bf16") if bf16 else (torch.float32, "no")
    base = tmp / case
    base.mkdir()
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(base)
    model = build_model(case, base, device, dtype)
    data = make_text(tmp / f"{case}.json", rows=max(64, args.batch * 4))
    engine, bare = [], []
    for repeat in range(args.repeats):
        # Alternate the order so drift (clocks, caches) hits both sides alike.
        order = ("engine", "bare") if repeat % 2 == 0 else ("bare", "engine")
        for side in order:
            sync(device)
            if side == "engine":
                engine.append(run_engine(model, base, data, tmp / f"out-{case}-{repeat}", args, precision))
            else:
                bare.append(run_bare(model, tokenizer, data, args, torch.bfloat16 if bf16 else None))
    tokens_per_step = args.batch * args.seq_len
    e, b = statistics.median(t.wall / t.steps for t in engine), statistics.median(t.wall / t.steps for t in bare)
    # Process CPU time is the steadier measure on a shared CPU (other processes steal wall time).
    e_cpu = statistics.median(t.cpu / t.steps for t in engine)
    b_cpu = statistics.median(t.cpu / t.steps for t in bare)
    peaks = {
        side: max((t.peak_bytes or 0) for t in runs) or None for side, runs in (("engine", engine), ("bare", bare))
    }
    return {
        "case": case,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "engine_s_per_step": e,
        "bare_s_per_step": b,
        "engine_tokens_per_s": tokens_per_step / e,
        "bare_tokens_per_s": tokens_per_step / b,
        "time_ratio": e / b,
        "cpu_time_ratio": e_cpu / b_cpu,
        "peak_bytes": peaks,
        "engine_runs": [asdict(t) for t in engine],
        "bare_runs": [asdict(t) for t in bare],
        "target": TARGET_RATIO,
        "met": e / b <= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tiny"], choices=("tiny", "llama1b"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3, help="at least 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "llm_vs_bare.json")
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 2:
        parser.error("--warmup-steps must be at least 1 and --steps at least 2 (the engine reports a step late)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            result = bench_case(case, args, Path(tmp))
            results.append(result)
            print(
                f"{case:8s} {result['device']:24s} {result['precision']:4s} "
                f"engine {result['engine_tokens_per_s']:10.0f} tok/s  "
                f"bare {result['bare_tokens_per_s']:10.0f} tok/s  "
                f"time ratio {result['time_ratio']:.3f} (process CPU time {result['cpu_time_ratio']:.3f}) "
                f"({'meets' if result['met'] else 'MISSES'} <= {TARGET_RATIO})",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
