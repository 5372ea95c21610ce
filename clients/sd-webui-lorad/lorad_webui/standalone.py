"""The LoRA Training tab as its own page, without AUTOMATIC1111: ``python -m lorad_webui.standalone``.

Needs gradio 3.41 (the API A1111 ships), grpcio and protobuf; run it from the extension folder (or
with it on PYTHONPATH). Base models are the checkpoints in ``--models-dir`` (``*.safetensors``,
``*.ckpt`` and diffusers folders) plus any path typed into the page.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class StandaloneHost:
    """lorad_webui.actions.Host for the standalone page: folders from the command line."""

    lora_folder: Path
    work_folder: Path
    models_dir: Path | None = None
    address: str = ""
    weight: float = 0.8

    def lora_dir(self) -> Path:
        """``--lora-dir``."""
        return self.lora_folder

    def work_dir(self) -> Path:
        """``--work-dir``."""
        return self.work_folder

    def checkpoints(self) -> dict[str, str]:
        """Checkpoint files and diffusers folders (those with model_index.json) in ``--models-dir``."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return {}
        found = {}
        for path in sorted(self.models_dir.iterdir()):
            if path.suffix.lower() in CHECKPOINT_SUFFIXES or (path / "model_index.json").is_file():
                found[path.name] = str(path)
        return found

    def refresh_loras(self) -> None:
        """Nothing to refresh: the page has no LoRA list."""

    def daemon_address(self) -> str:
        """``--address`` ("" = the local daemon)."""
        return self.address

    def snippet_weight(self) -> float:
        """``--weight``."""
        return self.weight


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m lorad_webui.standalone", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lora-dir", type=Path, default=Path("models/Lora"), help="where finished LoRAs go (default: ./models/Lora)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("outputs/lorad"),
        help="uploads and training runs (default: ./outputs/lorad)",
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="base models to list")
    parser.add_argument("--address", default="", help="the daemon's address (default: find the local daemon)")
    parser.add_argument("--weight", type=float, default=0.8, help="weight in the <lora:name:weight> snippet")
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve the page on")
    parser.add_argument("--port", type=int, default=7861, help="port to serve the page on")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the page until interrupted."""
    args = parse_args(argv)
    from lorad_webui.ui import build_ui

    host = StandaloneHost(args.lora_dir.resolve(), args.work_dir.resolve(), args.models_dir, args.address, args.weight)
    blocks = build_ui(host)
    blocks.queue()
    blocks.launch(server_name=args.host, server_port=args.port, show_api=False, quiet=True, prevent_thread_lock=True)
    # Printed once the server answers: scripts (and the browser test) wait for this line.
    print(f"lorad LoRA Training page: http://{args.host}:{args.port}", flush=True)
    blocks.block_thread()


if __name__ == "__main__":
    main()
