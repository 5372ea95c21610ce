"""The ``lorad`` command line.

Importing this module is cheap (no torch): each command imports what it needs when it runs, so
quick commands answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from lorad import __version__
from lorad.errors import LoradError, TrainingInterrupted

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _print_error(err: LoradError) -> None:
    print(f"error: {err}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def _how_to_use(outputs: dict[str, str], name: str) -> str:
    return (f"\nLoRA written:\n"
            f"  kohya / AUTOMATIC1111: {outputs['kohya']}\n"
            f"  diffusers:             {outputs['diffusers']}\n"
            f"  summary:               {outputs['summary']}\n"
            f"Use it: copy the .safetensors into stable-diffusion-webui/models/Lora and prompt with "
            f"<lora:{name}:0.8>;\n"
            f"or in diffusers: pipe.load_lora_weights(\"{Path(outputs['diffusers']).parent}\")")


def run_training(config_path: Path, base_dir: Path) -> int:
    """Train in this process, drawing progress; Ctrl-C saves a checkpoint and exits cleanly."""
    from lorad.config import load_config

    config = load_config(config_path, base_dir=base_dir)
    from lorad.engines.sd.train import train_sd_lora
    from lorad.progress import TerminalProgress, quiet_libraries

    quiet_libraries()

    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():  # second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)...",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = TerminalProgress()
    try:
        result = train_sd_lora(config, on_event=progress, stop=stop)
    except TrainingInterrupted as err:
        progress.close()
        print(f"{err}; checkpoint: {err.checkpoint or '(none, stopped before the first step)'}",
              file=sys.stderr)
        if err.checkpoint:
            print(f"to continue, add `resume_from: latest` to {config_path} and run the same command",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)
    print(_how_to_use(result.outputs, config.output_name))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    return run_training(Path(args.config), Path.cwd())


def cmd_config(args: argparse.Namespace) -> int:
    from lorad.config import load_config, render_example

    if args.check:
        config = load_config(args.check, base_dir=Path.cwd())
        print(f"{args.check}: OK — LoRA `{config.output_name}` into {config.output_dir}")
        return EXIT_OK
    sys.stdout.write(render_example())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from lorad.demo import run_demo

    return run_demo(Path(args.dir).resolve(), steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorad", description="Train LoRAs locally: one YAML config, one command.")
    parser.add_argument("--version", action="version", version=f"lorad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a LoRA from a YAML config",
                           description="Train a LoRA from a YAML config, in this process. Relative "
                           "paths in the config resolve against the current directory.")
    train.add_argument("--config", "-c", required=True, help="the YAML config file")
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="print an annotated example config, or check one")
    group = config.add_mutually_exclusive_group(required=True)
    group.add_argument("--example", action="store_true", help="print every key with its help and default")
    group.add_argument("--check", metavar="FILE", help="validate a config and report every problem")
    config.set_defaults(func=cmd_config)

    demo = sub.add_parser("demo", help="train a tiny built-in model end to end (offline, < 1 min)")
    demo.add_argument("--dir", default="lorad-demo", help="work folder (default: ./lorad-demo)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorad`` console script; returns the exit code."""
    # Never reach out to a model hub unless a command explicitly asks to.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoradError as err:
        _print_error(err)
        from lorad.errors import ConfigError

        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
