"""``lorad train`` without a daemon (``--local``, the demo, and ``torchrun`` ranks): the run happens in
this process, its progress drawn in the terminal."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from lorad.cli.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from lorad.errors import TrainingInterrupted


def run_training(config_path: Path, base_dir: Path) -> int:
    """Train in this process, drawing progress; Ctrl-C saves a checkpoint and exits cleanly."""
    from lorad.config.dispatch import load_any_config
    from lorad.families.registry import spec_for

    config = load_any_config(config_path, base_dir=base_dir)
    from lorad.cli.progress import TerminalProgress, quiet_libraries

    quiet_libraries()

    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():  # second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = TerminalProgress()
    try:
        from lorad.training.loop import train

        captions = None
        if spec_for(config).uses_captioner:
            from lorad.captioning.training import caption_filler

            # Images without a caption: captioned first when the config names a captioner, else named in a warning.
            captions = caption_filler(config, on_event=progress, stop=stop)
        result = train(config, on_event=progress, stop=stop, caption_missing=captions)
    except TrainingInterrupted as err:
        progress.close()
        print(f"{err}; checkpoint: {err.checkpoint or '(none, stopped before the first step)'}", file=sys.stderr)
        if err.partial:
            print(f"partial LoRA of the last step (usable as is): {err.partial}", file=sys.stderr)
        if err.checkpoint:
            print(f"to continue, add `resume_from: latest` to {config_path} and run the same command", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)
    from lorad.cli.daemon_commands import how_to_use

    print(how_to_use(result.outputs, config.output_name))
    return EXIT_OK
