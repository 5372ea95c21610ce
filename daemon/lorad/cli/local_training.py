"""``lorad train`` without a daemon (``--local``, the demo, and ``torchrun`` ranks): the run happens in
this process, its progress drawn in the terminal."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.cli.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from lorad.errors import LoradError, TrainingInterrupted
from lorad.events import ignore_events

if TYPE_CHECKING:
    from lorad.config.schema import TrainingKeys
    from lorad.training.distributed import Ranks


def run_training(config_path: Path, base_dir: Path) -> int:
    """Train in this process, drawing progress; Ctrl-C saves a checkpoint and exits cleanly. Started by
    torchrun (or srun with its variables), the process is one rank of a job on several devices: rank 0
    draws the progress and writes the outputs."""
    from lorad.config.dispatch import load_any_config
    from lorad.families.registry import spec_for
    from lorad.training.distributed import SINGLE, launched_by_torchrun

    config = load_any_config(config_path, base_dir=base_dir)
    if not launched_by_torchrun():
        if config.devices.ranks > 1:
            raise LoradError(
                f"`devices`: {config_path} asks for {config.devices.ranks} devices; training in this process uses one",
                "submit it to the daemon (`lorad serve`, one worker per GPU), launch it with torchrun (see the "
                'README\'s "Several GPUs"), or set `devices: 1`',
            )
        return _train_here(config, config_path, SINGLE, spec_for(config).uses_captioner)
    from lorad.training.distributed import join_launched_group, leave_group

    ranks, device = join_launched_group(config.device)
    try:
        if not config.devices.is_auto and config.devices.ranks != ranks.world:
            print(
                f"warning: `devices` asks for {config.devices.ranks} devices; torchrun started {ranks.world} ranks, "
                f"which is what trains (global batch {config.batch_size} × {ranks.world} × "
                f"{config.gradient_accumulation_steps})",
                file=sys.stderr,
            )
        config = replace(config, device=str(device))
        return _train_here(config, config_path, ranks, ranks.is_main and spec_for(config).uses_captioner)
    finally:
        leave_group()


def _train_here(config: TrainingKeys, config_path: Path, ranks: Ranks, captions_here: bool) -> int:
    """One process's part of the run: the whole of it, or one rank of several (only rank 0 shows progress)."""
    from lorad.cli.progress import TerminalProgress, quiet_libraries

    quiet_libraries()

    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():  # second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = TerminalProgress() if ranks.is_main else None
    try:
        from lorad.training.loop import train

        captions = None
        if captions_here:
            from lorad.captioning.training import caption_filler

            # Images without a caption: captioned first when the config names a captioner, else named in a warning.
            captions = caption_filler(config, on_event=progress or ignore_events, stop=stop)
        result = train(config, on_event=progress or ignore_events, stop=stop, caption_missing=captions, ranks=ranks)
    except TrainingInterrupted as err:
        if progress is None:
            return EXIT_INTERRUPTED  # rank 0 says where the checkpoint is
        progress.close()
        print(f"{err}; checkpoint: {err.checkpoint or '(none, stopped before the first step)'}", file=sys.stderr)
        if err.partial:
            print(f"partial LoRA of the last step (usable as is): {err.partial}", file=sys.stderr)
        if err.checkpoint:
            print(f"to continue, add `resume_from: latest` to {config_path} and run the same command", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGINT, previous)
    if progress is None:
        return EXIT_OK
    from lorad.cli.daemon_commands import how_to_use

    print(how_to_use(result.outputs, config.output_name))
    return EXIT_OK
