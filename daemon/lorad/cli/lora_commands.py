"""``lorad lora inspect|resize|merge|convert|bake|extract`` and ``lorad export gguf``: file tools that run in
this process (no daemon needed). Importing this module is cheap; each command imports its tool when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorad.cli.exit_codes import EXIT_FAILED, EXIT_OK

LAYOUT_CHOICES = ("kohya", "diffusers", "comfyui", "peft")


def cmd_lora(args: argparse.Namespace) -> int:
    """Run one LoRA tool and print its result."""
    action = args.lora_action
    if action == "inspect":
        from lorad.lora_tools.inspect import inspect_lora
        from lorad.server.proto_convert import inspect_response

        report = inspect_lora(Path(args.file))
        print(json.dumps(report.to_dict(), indent=2) if args.json else inspect_response(report).text)
        return EXIT_FAILED if args.strict and report.problems else EXIT_OK
    if action == "resize":
        from lorad.lora_tools.resize import resize_lora

        result = resize_lora(Path(args.file), Path(args.output), rank=args.rank, dynamic=args.dynamic, layout=args.to)
        if args.verbose:
            for module in result.modules:
                print(f"  {module.name}: rank {module.old_rank} -> {module.new_rank}, kept {module.kept:.4f}")
        print(result.summary())
        return EXIT_OK
    if action == "merge":
        from lorad.lora_tools.merge import merge_loras, parse_weighted

        result = merge_loras([parse_weighted(f) for f in args.files], Path(args.output), rank=args.rank, layout=args.to)
        print(result.summary())
        return EXIT_OK
    if action == "convert":
        from lorad.lora_tools.convert import convert_lora

        written = convert_lora(
            Path(args.file), Path(args.output), to=args.to, base=Path(args.base) if args.base else None
        )
        print(f"wrote {written} ({args.to} layout)")
        return EXIT_OK
    if action == "bake":
        from lorad.lora_tools.bake import bake_loras
        from lorad.lora_tools.merge import parse_weighted

        print(bake_loras([parse_weighted(f) for f in args.files], Path(args.into), Path(args.output)).summary())
        return EXIT_OK
    from lorad.lora_tools.extract import extract_lora

    result = extract_lora(
        Path(args.base),
        Path(args.tuned),
        Path(args.output),
        rank=args.rank,
        conv_rank=args.conv_rank,
        min_diff=args.min_diff,
        layout=args.to,
    )
    print(result.summary())
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``lorad export gguf OUTPUT_DIR``: the LLM job's adapter (and merged model) for llama.cpp and Ollama."""
    from lorad.families.llm.gguf import export_gguf

    result = export_gguf(
        Path(args.output_dir),
        quant=args.quant,
        base_model=args.base_model,
        merged=not args.no_merged,
        llama_cpp=Path(args.llama_cpp) if args.llama_cpp else None,
    )
    print(result.summary())
    return EXIT_OK


def add_lora_commands(sub: argparse._SubParsersAction) -> None:
    """The ``lora`` and ``export`` subcommands (one call from :func:`lorad.cli.main.build_parser`)."""
    lora = sub.add_parser(
        "lora",
        help="LoRA file tools: inspect, resize, merge, convert, bake, extract",
        description="Work with LoRA files after training: runs in this process, no daemon needed.",
    )
    actions = lora.add_subparsers(dest="lora_action", required=True, metavar="ACTION")
    inspect = actions.add_parser("inspect", help="what a LoRA file is: base model, ranks, metadata, problems")
    inspect.add_argument("file", help="a LoRA .safetensors, a PEFT adapter folder or a diffusers LoRA folder")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--strict", action="store_true", help="exit 1 when any problem is found")

    resize = actions.add_parser("resize", help="SVD to a lower or dynamic rank (alpha keeps the effect)")
    resize.add_argument("file")
    resize.add_argument("--rank", type=int, help="the new rank (with --dynamic: the largest rank allowed)")
    resize.add_argument(
        "--dynamic", metavar="METHOD:VALUE", help="per-module rank: sv_fro:0.9, sv_cumulative:0.9 or sv_ratio:N"
    )
    resize.add_argument("-o", "--output", required=True)
    resize.add_argument("--to", choices=LAYOUT_CHOICES, help="output layout (default: the input's)")
    resize.add_argument("-v", "--verbose", action="store_true", help="print each module's new rank and kept energy")

    merge = actions.add_parser("merge", help="merge LoRAs: exact (ranks concatenated) or to --rank by SVD")
    merge.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    merge.add_argument("--rank", type=int, help="SVD to this rank (default: exact merge)")
    merge.add_argument("-o", "--output", required=True)
    merge.add_argument("--to", choices=LAYOUT_CHOICES, help="output layout (default: the first input's)")

    convert = actions.add_parser("convert", help="another layout: kohya, diffusers, comfyui, peft (exact)")
    convert.add_argument("file")
    convert.add_argument("--to", required=True, choices=LAYOUT_CHOICES)
    convert.add_argument("-o", "--output", required=True)
    convert.add_argument(
        "--base", help="the model's checkpoint or diffusers folder, for architectures other than SD 1.5 / 2.1 (ComfyUI)"
    )

    bake = actions.add_parser("bake", help="merge LoRAs into a single-file checkpoint (streams; atomic)")
    bake.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    bake.add_argument("--into", required=True, metavar="BASE.safetensors")
    bake.add_argument("-o", "--output", required=True, metavar="MERGED.safetensors")

    extract = actions.add_parser("extract", help="a LoRA from the difference of two checkpoints (SVD)")
    extract.add_argument("--base", required=True, help="the original single-file checkpoint")
    extract.add_argument("--tuned", required=True, help="the fine-tuned single-file checkpoint")
    extract.add_argument("--rank", type=int, required=True)
    extract.add_argument("--conv-rank", type=int, help="also extract resnet/sampler convolutions at this rank")
    extract.add_argument("--min-diff", type=float, default=0.0, help="leave out layers changed by at most this much")
    extract.add_argument("-o", "--output", required=True)
    extract.add_argument("--to", choices=LAYOUT_CHOICES, default="kohya")
    lora.set_defaults(func=cmd_lora)

    export = sub.add_parser("export", help="export a finished job's output for other tools (`export gguf DIR`)")
    targets = export.add_subparsers(dest="export_target", required=True, metavar="FORMAT")
    gguf = targets.add_parser(
        "gguf",
        help="an LLM job's adapter and merged model as GGUF for llama.cpp, plus an Ollama Modelfile",
        description="Converts with llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) "
        "and the gguf package; writes OUTPUT_DIR/gguf/.",
    )
    gguf.add_argument("output_dir", metavar="OUTPUT_DIR", help="the LLM job's output_dir (with adapter/)")
    gguf.add_argument("--quant", choices=("f16", "q8_0", "q4_k_m"), default="f16")
    gguf.add_argument("--base-model", help="the base model folder (default: the one the adapter names)")
    gguf.add_argument("--no-merged", action="store_true", help="skip the merged model GGUF")
    gguf.add_argument(
        "--llama-cpp", help="a llama.cpp source folder with the converters (default: $LORAD_LLAMA_CPP, then the cache)"
    )
    export.set_defaults(func=cmd_export)
