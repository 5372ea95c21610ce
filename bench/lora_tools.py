"""What the LoRA toolbox costs on real-size files: ``bake`` and ``extract`` on SD1.5, ``export gguf`` on TinyLlama-1.1B.

Questions and baselines, each measured in the same run:

- **bake** (a rank-32 kohya LoRA into an SD1.5 single-file checkpoint): seconds against the I/O floor (reading
  the checkpoint and writing a copy, 16 MiB at a time, into a new file fsynced and renamed as bake's atomic
  write does), as the median ratio of (copy, bake) pairs run back to back (a shared disk's speed changes from
  minute to minute); peak RSS against the largest input file (goal: < 1.5x) and against the in-memory floor
  (safetensors ``load_file`` + ``save_file`` of the checkpoint: what a tool holding it needs before any math).
- **extract** (a rank-32 LoRA from the base and the baked checkpoint): seconds against the I/O floor (reading
  both files; extract is bound by its SVDs, not by I/O), and peak RSS against the largest input (goal: < 1.5x)
  and the in-memory floor (both files read with ``load_file``, every page touched). The LoRA it writes keeps
  all of the baked difference (its summary says how much).
- **export gguf** (an LLM job's PEFT adapter on TinyLlama-1.1B's shape: adapter, base and merged GGUFs and the
  Modelfile, through llama.cpp's converters): seconds against one bare ``convert_hf_to_gguf.py`` of the base.
  Skipped, saying why, when llama.cpp's converters are not installed (``scripts/llama_cpp_setup``).

Every model is random and built here from the real configs (SD1.5: lorad's shipped UNet, VAE and CLIP configs,
written as an A1111 single file in the LDM layout, fp16; TinyLlama-1.1B: its LlamaConfig, bf16, with lorad's
tiny Llama-style tokenizer padded to 32000 tokens); nothing is downloaded. Each measured operation runs in a
fresh process: its peak RSS (VmHWM) includes the Python + torch import floor, reported beside it.

Run ``python -m bench.lora_tools [--quick] [--only sd15|gguf] [--threads N]``; ``--quick`` uses a quarter of
SD1.5's widths and a small Llama (a smoke run: the import floor then dominates memory). Results go to
bench/results/lora_tools.json. Files are written under ``--work`` (default: a temporary folder) and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RSS_GOAL = 1.5  # peak RSS / the largest input file
LORA_RANK = 32
# (copy, bake) pairs; the median paired ratio counts. Extract and export run once.
REPEATS = 3
CHUNK = 16 * 2**20
# kohya's default LoRA network: every transformer linear (and 1x1 projection) of the UNet and the text encoder.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- one operation in a fresh process -----------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child_main(op: str, args: list[str], threads: int) -> None:
    """Run ``op`` here and print one JSON line: seconds, peak RSS (VmHWM), and the RSS before it started."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file, save_file

    from lorad.lora_tools.bake import bake_loras
    from lorad.lora_tools.extract import extract_lora

    floor = _status_bytes("VmRSS")
    summary = ""
    start = time.perf_counter()
    if op == "copy":
        # The I/O floor of bake, written the way bake writes: into a new file, fsynced, renamed over the last
        # one. (On a virtual disk, writing into new blocks can take ten times longer than rewriting a file.)
        temporary = Path(args[1] + ".tmp")
        with open(args[0], "rb") as source, open(temporary, "wb") as dest:
            while block := source.read(CHUNK):
                dest.write(block)
            dest.flush()
            os.fsync(dest.fileno())
        os.replace(temporary, args[1])
    elif op == "read":  # the I/O floor of extract: read both checkpoints
        for path in args:
            with open(path, "rb") as source:
                while source.read(CHUNK):
                    pass
    elif op == "load_save":  # the in-memory floor of bake
        save_file(load_file(args[0]), args[1])
    elif op == "load_both":  # the in-memory floor of extract: both files read (load_file maps them: touch each page)
        held = [load_file(path) for path in args]
        for tensors in held:
            for tensor in tensors.values():
                flat = tensor.reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].sum()
        del held
    elif op == "bake":
        summary = bake_loras([(Path(args[0]), 1.0)], Path(args[1]), Path(args[2])).summary()
    elif op == "extract":
        summary = extract_lora(Path(args[0]), Path(args[1]), Path(args[2]), rank=int(args[3])).summary()
    elif op == "export_gguf":
        from lorad.families.llm.gguf import export_gguf

        export_gguf(Path(args[0]), quant="f16")
    else:
        raise SystemExit(f"unknown operation {op}")
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_rss": _status_bytes("VmHWM"), "floor_rss": floor}
    print(json.dumps(result | ({"summary": summary.split(": ", 1)[-1]} if summary else {})))


def measure(op: str, *args: str | Path, threads: int) -> dict[str, Any]:
    """``op`` in a fresh process (``python -m bench.lora_tools --child op ...``): its seconds and memory."""
    os.sync()  # the previous step's dirty pages are written back now, not during this one
    env = os.environ | {"OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-m", "bench.lora_tools", "--threads", str(threads), "--child", op, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    summary = f"   {result['summary']}" if "summary" in result else ""
    print(
        f"  {op:<12} {result['seconds']:7.1f} s   peak RSS {result['peak_rss'] / 2**30:5.2f} GiB{summary}", flush=True
    )
    return result


# --- random models, built here ------------------------------------------------------------------------


def sd15_configs(divisor: int) -> dict[str, dict[str, Any]]:
    """lorad's shipped SD1.5 configs (UNet, VAE, CLIP), their widths divided by ``divisor`` (1: the real size)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from bench.engine_vs_bare import sd_config_dir

    root = sd_config_dir()
    unet = dict(UNet2DConditionModel.load_config(root / "unet"))
    vae = dict(AutoencoderKL.load_config(root / "vae"))
    text = CLIPTextConfig.from_pretrained(root / "text_encoder").to_dict()
    if divisor > 1:
        unet["block_out_channels"] = [c // divisor for c in unet["block_out_channels"]]
        unet["cross_attention_dim"] //= divisor
        unet["norm_num_groups"] = 32 // divisor
        vae["block_out_channels"] = [c // divisor for c in vae["block_out_channels"]]
        vae["norm_num_groups"] = 32 // divisor
        text["hidden_size"] //= divisor
        text["intermediate_size"] //= divisor
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _meta_sd(configs: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: the weights are drawn one tensor at a time when written
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return unet, vae, text


def write_random(dest: Path, shapes: dict[str, tuple[int, ...]], dtype: Any, metadata: dict[str, str]) -> Path:
    """A .safetensors of random ``dtype`` tensors (std 0.02), streamed: one tensor in memory at a time."""
    import torch

    from lorad.lora_tools.tensor_files import TensorWriter

    generator = torch.Generator().manual_seed(0)
    names = sorted(shapes)
    writer = TensorWriter(dest, [(name, dtype, shapes[name]) for name in names], metadata)
    try:
        for name in names:
            writer.write(name, (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype))
    finally:
        writer.close()
    return dest


def build_sd15_checkpoint(dest: Path, configs: dict[str, dict[str, Any]]) -> Path:
    """An A1111 single-file SD1.5 checkpoint (LDM key names, fp16) with random weights."""
    import torch

    from lorad.models.ldm_layout import clip_to_ldm, unet_to_ldm, vae_to_ldm

    unet, vae, text = _meta_sd(configs)
    tensors = {
        **unet_to_ldm(unet.state_dict(), configs["unet"]),
        **vae_to_ldm(vae.state_dict(), configs["vae"]),
        **clip_to_ldm(text.state_dict()),
    }
    return write_random(dest, {k: tuple(v.shape) for k, v in tensors.items()}, torch.float16, {"format": "pt"})


def build_sd15_lora(dest: Path, configs: dict[str, dict[str, Any]], rank: int) -> Path:
    """A rank-``rank`` kohya LoRA (alpha rank/2, fp16) on kohya's default modules, as lorad's SD training writes it."""
    import torch

    from lorad.lora.adapters import attach_lora, lora_state_dict
    from lorad.lora.kohya_format import save_kohya, to_kohya
    from lorad.lora.targets import resolve_targets

    unet, _, text = _meta_sd(configs)
    generator = torch.Generator().manual_seed(1)
    parts = {}
    for part, model, names in (("unet", unet, UNET_TARGETS), ("text_encoder", text, TEXT_TARGETS)):
        paths = resolve_targets(model, names, key="targets")
        attach_lora(model, adapter_name="bench", target_paths=paths, rank=rank, alpha=rank / 2)
        state = lora_state_dict(model, "bench")
        parts[part] = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in state.items()}
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)}
    save_kohya(dest, to_kohya(parts, rank / 2, torch.float16), metadata)
    return dest


def llama_config(quick: bool) -> Any:
    """TinyLlama-1.1B's architecture (or a small one for --quick), 32000 tokens."""
    from transformers import LlamaConfig

    shape = (
        {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8}
        if quick
        else {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32}
    )
    config = LlamaConfig(
        vocab_size=32000,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def write_padded_tokenizer(dest: Path, vocab_size: int) -> Any:
    """lorad's tiny Llama-style tokenizer (which llama.cpp's converter reads) padded with unused tokens to
    ``vocab_size``, so the vocabulary matches the embedding as in a real checkpoint."""
    from transformers import AutoTokenizer

    from lorad.models.tiny_llm import train_llama_style_tokenizer

    train_llama_style_tokenizer().save_pretrained(dest)
    path = dest / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    for index in range(len(vocab), vocab_size):
        vocab[f"<unused{index}>"] = index
    path.write_text(json.dumps(data, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(dest)


def build_llm_job(root: Path, quick: bool, rank: int = 16) -> tuple[Path, Path]:
    """(the base model folder, an LLM job's output_dir with its PEFT adapter): random weights, bf16 base."""
    import torch
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    from lorad.families.llm.adapter import write_adapter
    from lorad.lora.adapters import attach_lora_config, lora_state_dict

    base = root / "tinyllama"
    base.mkdir(parents=True)
    config = llama_config(quick)
    config.save_pretrained(base)
    tokenizer = write_padded_tokenizer(base, config.vocab_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    write_random(base / "model.safetensors", shapes, torch.bfloat16, {"format": "pt"})
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(LLM_TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    )
    attach_lora_config(model, adapter_name="default", config=lora)
    generator = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in lora_state_dict(model, "default").items()}
    job = root / "job"
    write_adapter(job / "adapter", state, lora, tokenizer, save_precision="bf16")
    return base, job


# --- the cases ----------------------------------------------------------------------------------------


def _ratio(result: dict[str, Any], size: int) -> dict[str, float]:
    return {
        "rss_over_input": result["peak_rss"] / size,
        "rss_over_input_above_floor": (result["peak_rss"] - result["floor_rss"]) / size,
    }


def sd15_case(work: Path, divisor: int, threads: int) -> dict[str, Any]:
    configs = sd15_configs(divisor)
    start = time.perf_counter()
    base = build_sd15_checkpoint(work / "sd15.safetensors", configs)
    lora = build_sd15_lora(work / "lora.safetensors", configs, LORA_RANK)
    size = base.stat().st_size
    print(
        f"built the SD1.5 checkpoint ({size / 2**30:.2f} GiB) and a rank-{LORA_RANK} LoRA "
        f"({lora.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    # Bake is I/O-bound: its time is compared with a copy of the checkpoint made just before, in pairs,
    # because a shared disk's speed changes from minute to minute.
    pairs = []
    for _ in range(REPEATS):
        copy = measure("copy", base, work / "copy.safetensors", threads=threads)
        pairs.append((copy, measure("bake", lora, base, work / "baked.safetensors", threads=threads)))
    (work / "copy.safetensors").unlink()
    floor_bake = measure("load_save", base, work / "copy.safetensors", threads=threads)
    (work / "copy.safetensors").unlink()
    read = measure("read", base, work / "baked.safetensors", threads=threads)
    floor_extract = measure("load_both", base, work / "baked.safetensors", threads=threads)
    extract = measure(
        "extract", base, work / "baked.safetensors", work / "extracted.safetensors", LORA_RANK, threads=threads
    )
    bake = min((b for _, b in pairs), key=lambda r: r["seconds"]) | {
        "peak_rss": max(b["peak_rss"] for _, b in pairs),
        "time_over_io_floor": statistics.median(b["seconds"] / c["seconds"] for c, b in pairs),
        "paired_ratios": [b["seconds"] / c["seconds"] for c, b in pairs],
    }
    return {
        "checkpoint_bytes": size,
        "lora_bytes": lora.stat().st_size,
        "bake": bake | _ratio(bake, size) | {"rss_over_in_memory_floor": bake["peak_rss"] / floor_bake["peak_rss"]},
        "extract": extract
        | _ratio(extract, size)
        | {
            "time_over_io_floor": extract["seconds"] / read["seconds"],
            "rss_over_in_memory_floor": extract["peak_rss"] / floor_extract["peak_rss"],
        },
        "baselines": {
            "copy": [c for c, _ in pairs],
            "load_save": floor_bake,
            "read": read,
            "load_both": floor_extract,
        },
    }


def gguf_case(work: Path, quick: bool, threads: int) -> dict[str, Any]:
    from lorad.errors import ExportError
    from lorad.families.llm.gguf import find_llama_cpp

    try:
        tools = find_llama_cpp()
    except ExportError as err:
        return {"skipped": f"{err} ({err.hint})"}
    start = time.perf_counter()
    base, job = build_llm_job(work / "llm", quick)
    print(
        f"built the Llama ({(base / 'model.safetensors').stat().st_size / 2**30:.2f} GiB bf16) and a rank-16 "
        f"adapter in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    command = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(base), "--outtype", "f16"]
    os.sync()
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--outfile", str(work / "bare.gguf")],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    bare = time.perf_counter() - start
    (work / "bare.gguf").unlink()
    print(f"  {'convert':<12} {bare:7.1f} s   (bare convert_hf_to_gguf.py of the base)", flush=True)
    export = measure("export_gguf", job, threads=threads)
    return {"bare_convert_seconds": bare, "export": export, "time_over_bare_convert": export["seconds"] / bare}


def print_table(results: dict[str, Any]) -> None:
    sd = results.get("sd15")
    if sd:
        print(f"\nSD1.5 checkpoint {sd['checkpoint_bytes'] / 2**30:.2f} GiB, LoRA {sd['lora_bytes'] / 2**20:.0f} MiB")
        print("op       seconds  x I/O floor  peak RSS  / input  (above import floor)  / in-memory floor")
        for op in ("bake", "extract"):
            r = sd[op]
            print(
                f"{op:<8} {r['seconds']:7.1f}  {r['time_over_io_floor']:11.2f}  {r['peak_rss'] / 2**30:5.2f} GiB  "
                f"{r['rss_over_input']:6.2f}  ({r['rss_over_input_above_floor']:.2f})                 "
                f"{r['rss_over_in_memory_floor']:.2f}"
            )
            verdict = "within" if r["rss_over_input"] < RSS_GOAL else "ABOVE"
            print(f"         peak RSS {verdict} the {RSS_GOAL}x goal")
    gguf = results.get("gguf")
    if gguf and "skipped" in gguf:
        print(f"\nexport gguf: skipped: {gguf['skipped']}")
    elif gguf:
        print(
            f"\nexport gguf (adapter + base + merged, f16): {gguf['export']['seconds']:.1f} s = "
            f"{gguf['time_over_bare_convert']:.2f} x one bare convert_hf_to_gguf.py of the base "
            f"({gguf['bare_convert_seconds']:.1f} s)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of SD1.5's widths and a small Llama")
    parser.add_argument("--only", choices=("sd15", "gguf"), help="one case")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each operation (0: torch's default)")
    parser.add_argument("--work", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1:], args.threads)
        return 0
    RESULTS_DIR.mkdir(exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick, "threads": args.threads, "cpus": os.cpu_count()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorad-bench-lora-tools-", dir=args.work) as scratch:
        work = Path(scratch)
        if args.only in (None, "sd15"):
            (work / "sd").mkdir()
            results["sd15"] = sd15_case(work / "sd", 4 if args.quick else 1, args.threads)
        if args.only in (None, "gguf"):
            (work / "gguf").mkdir()
            results["gguf"] = gguf_case(work / "gguf", args.quick, args.threads)
    results["total_seconds"] = time.perf_counter() - start
    print_table(results)
    out = RESULTS_DIR / "lora_tools.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['total_seconds']:.0f} s in all; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
