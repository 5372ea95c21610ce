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
from lorad.cli.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from lorad.errors import LoradError

STATE_CHOICES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def _print_error(err: LoradError) -> None:
    print(f"error: {err}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def _connect(timeout: float = 3.0):
    from lorad_client import LoradClient

    return LoradClient.connect(timeout=timeout)


def cmd_train(args: argparse.Namespace) -> int:
    """Submit to the running daemon and follow; without one (or as a torchrun rank), train in this process."""
    from lorad.training.distributed import launched_by_torchrun

    if not args.embedded and not launched_by_torchrun():
        from lorad_client import DaemonUnavailable

        try:
            client = _connect(timeout=1.0)
        except DaemonUnavailable:
            if args.detach:
                print("error: --detach needs a running daemon; start one with `lorad serve`", file=sys.stderr)
                return EXIT_USAGE
            print(
                "no lorad daemon running: training in this process (start one with `lorad serve` to "
                "keep models loaded and queue jobs)",
                file=sys.stderr,
            )
        else:
            from lorad.cli.daemon_commands import submit_and_follow

            with client:
                return submit_and_follow(client, Path(args.config), detach=args.detach)
    from lorad.cli.local_training import run_training

    return run_training(Path(args.config), Path.cwd())


# Option names of `lorad caption`, for messages about them.
CAPTION_OPTION_NAMES = {
    "folder": "DIR",
    "captioner": "--captioner",
    "model": "--model",
    "format": "--format",
    "device": "--device",
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "num_beams": "--beams",
    "prompt": "--prompt",
    "general_threshold": "--general-threshold",
    "character_threshold": "--character-threshold",
    "vocabulary": "--vocabulary",
    "top_k": "--top-k",
    "caption_extension": "--caption-extension",
    "regenerate": "--regenerate",
}


def _caption_options(args: argparse.Namespace):
    from lorad.captioning.options import CaptionOptions

    exclude = tuple(t.strip() for value in args.exclude or () for t in value.split(",") if t.strip())
    return CaptionOptions(
        max_length=args.max_length,
        num_beams=args.beams,
        prompt=args.prompt or "",
        general_threshold=args.general_threshold,
        character_threshold=args.character_threshold,
        exclude_tags=exclude,
        vocabulary=Path(args.vocabulary) if args.vocabulary else None,
        top_k=args.top_k,
    )


def run_captioning(args: argparse.Namespace, base_dir: Path) -> int:
    """Caption a folder in this process, drawing progress; Ctrl-C stops after the current batch."""
    from lorad.captioning.folder import caption_folder
    from lorad.captioning.request import caption_request
    from lorad.cli.daemon_commands import show_captions
    from lorad.server.proto_convert import caption_update_to_proto

    request = caption_request(
        args.dir,
        base_dir=base_dir,
        captioner=args.captioner,
        model=args.model or "",
        options=_caption_options(args),
        batch_size=args.batch_size,
        trigger_word=args.trigger or "",
        format=args.format,
        caption_extension=args.caption_extension,
        overwrite=args.overwrite,
        regenerate=args.regenerate,
        device=args.device,
        allow_pickle=args.allow_pickle,
        names=CAPTION_OPTION_NAMES,
        source="lorad caption",
    )
    if request.captioner != "wd14":  # the tagger runs on onnxruntime: no transformers to quiet (or import)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nstopping after this batch; the captions written so far are kept (Ctrl-C again to abort)", file=sys.stderr
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        updates = caption_folder(request, should_stop=stop.is_set)
        return show_captions((caption_update_to_proto(u) for u in updates), verbose=args.verbose)
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption through the running daemon (its captioners stay resident); without one, in this process."""
    if not args.embedded:
        from lorad_client import DaemonUnavailable

        try:
            client = _connect(timeout=1.0)
        except DaemonUnavailable:
            print("no lorad daemon running: captioning in this process", file=sys.stderr)
        else:
            from lorad.cli.daemon_commands import caption_with_daemon
            from lorad.server.proto_convert import CAPTIONER_TO_PROTO, FORMAT_TO_PROTO, caption_options_to_proto

            with client:
                return caption_with_daemon(
                    client,
                    args.dir,
                    verbose=args.verbose,
                    captioner=CAPTIONER_TO_PROTO.get(args.captioner, 0),
                    model=args.model or "",
                    trigger_word=args.trigger or "",
                    format=FORMAT_TO_PROTO[args.format],
                    overwrite=args.overwrite,
                    regenerate=args.regenerate,
                    caption_extension=args.caption_extension,
                    device=args.device,
                    batch_size=args.batch_size,
                    allow_pickle=args.allow_pickle,
                    options=caption_options_to_proto(_caption_options(args)),
                )
    return run_captioning(args, Path.cwd())


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from lorad.cli.progress import quiet_libraries
    from lorad.server.daemon import serve_forever
    from lorad.server.settings import daemon_settings

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_libraries()
    settings = daemon_settings(
        args.listen or (),
        default_keep_alive=args.keep_alive,
        memory_budget_gb=args.memory_budget,
        resume_interrupted=not args.no_resume,
        cpu_workers=args.cpu_workers,
        in_process=args.in_process,
        start_workers=True,  # the first job does not wait for its worker to import torch
        log_level=getattr(logging, args.log_level.upper()),
    )

    def ready(daemon) -> None:
        token = " (token required: clients of this user read it from the state directory)"
        print(
            f"lorad daemon ready on {', '.join(daemon.addresses)}{token}; state in {settings.home}",
            file=sys.stderr,
            flush=True,
        )

    return serve_forever(settings, ready=ready)


def cmd_status(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import print_status

    with _connect() as client:
        return print_status(client)


def cmd_jobs(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import print_jobs

    with _connect() as client:
        return print_jobs(client, args.state or (), args.limit)


def cmd_logs(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import follow_job

    with _connect() as client:
        return follow_job(client, args.job, live_bar=args.follow, history_only=not args.follow)


def cmd_cancel(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import cancel_job

    with _connect() as client:
        return cancel_job(client, args.job)


def cmd_samples(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import print_samples

    with _connect() as client:
        return print_samples(client, args.job)


def cmd_sample_now(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import ask_running_job

    with _connect() as client:
        return ask_running_job(client, args.job, "sample")


def cmd_save_now(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import ask_running_job

    with _connect() as client:
        return ask_running_job(client, args.job, "save")


def cmd_models(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import load_model, print_models, unload_model

    with _connect() as client:
        if args.action == "load":
            return load_model(client, args.model, args.keep_alive or 0.0)  # 0: the daemon's default
        if args.action == "unload":
            return unload_model(client, args.model)
        return print_models(client)


def cmd_watch(args: argparse.Namespace) -> int:
    from lorad.cli.daemon_commands import add_watch, print_watches, remove_watch, retry_watch

    with _connect() as client:
        if args.action == "add":
            return add_watch(
                client,
                args.dir,
                args.config,
                # Unset options go as 0, which the daemon reads as its own default (the one the help names).
                quiet_seconds=args.quiet_seconds or 0.0,
                min_new_images=args.min_new_images or 0,
                mode=args.mode,
                continue_steps=args.continue_steps or 0,
                publish_dir=args.publish_dir or "",
                polling=args.polling,
            )
        if args.action == "rm":
            return remove_watch(client, args.watch)
        if args.action == "retry":
            return retry_watch(client, args.watch)
        return print_watches(client)


def cmd_config(args: argparse.Namespace) -> int:
    from lorad.config.dispatch import load_any_config
    from lorad.families.registry import get_spec, spec_for

    if args.check:
        from lorad.config.preflight import preflight_problems
        from lorad.errors import ConfigError

        config = load_any_config(args.check, base_dir=Path.cwd())
        problems = preflight_problems(config)  # the model, the data and the target layers, read cheaply
        if problems:
            raise ConfigError(problems, args.check)
        spec = spec_for(config)
        what = "adapter" if spec.output_kind == "peft_adapter" else "LoRA"
        print(f"{args.check}: OK — {spec.title} {what} `{config.output_name}` into {config.output_dir}")
        return EXIT_OK
    try:
        spec = get_spec(args.example)
    except KeyError:
        from lorad.families.registry import family_names

        print(f"error: no model family {args.example!r}; choose one of: {', '.join(family_names())}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(spec.render_example())
    return EXIT_OK


def cmd_tui(args: argparse.Namespace) -> int:
    # Imported here: Textual is only needed by this command, and the dashboard never imports torch.
    from lorad_tui import run

    return run()


def cmd_demo(args: argparse.Namespace) -> int:
    from lorad.cli.demo import run_demo, run_llm_demo

    if args.llm:
        return run_llm_demo(Path(args.dir).resolve(), steps=args.steps or 40)
    return run_demo(Path(args.dir).resolve(), steps=args.steps or 30)


def cmd_webui_install(args: argparse.Namespace) -> int:
    from lorad.cli.webui_install import WebuiInstallError, install_extension

    try:
        target, done = install_extension(Path(args.webui_dir).expanduser().resolve(), copy=args.copy)
    except WebuiInstallError as err:
        _print_error(err)
        return EXIT_USAGE
    print(
        f"lorad WebUI extension {done}: {target}\n"
        'Restart the WebUI (its install step adds grpcio); the tab is "LoRA Training". '
        "Training needs the daemon running on this machine: `lorad serve`."
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorad", description="Train LoRAs locally: one YAML config, one command.")
    parser.add_argument("--version", action="version", version=f"lorad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a LoRA from a YAML config",
        description="Train a LoRA from a YAML config: submit it to the running lorad daemon and follow "
        "the job (Ctrl-C detaches; the job goes on), or, with no daemon running (or --embedded), train in "
        "this process. Started by torchrun (or srun with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), it is "
        "one rank of a job across GPUs and machines. Relative paths in the config resolve against the current "
        "directory.",
    )
    train.add_argument("--config", "-c", required=True, help="the YAML config file")
    train.add_argument(
        "--detach", "-d", action="store_true", help="submit to the daemon and print the job id instead of following it"
    )
    train.add_argument("--embedded", action="store_true", help="train in this process even if a daemon runs")
    train.set_defaults(func=cmd_train)

    caption = sub.add_parser(
        "caption",
        help="caption the images of a folder that have no caption",
        description="Write captions for the images in DIR (and its subfolders) that have none: into "
        "metadata.csv or <image>.txt files, whichever the folder already uses. Captions a person wrote are "
        "kept unless --overwrite; generated ones are listed in DIR/.lorad_captions.json. Runs in the daemon "
        "when one is running (the captioner stays loaded), else in this process. Exit 0 when every image "
        "has a caption afterwards, 1 when some could not be captioned.",
    )
    caption.add_argument("dir", help="the image folder")
    caption.add_argument(
        "--captioner",
        default="blip",
        choices=["blip", "wd14", "clip"],
        help="blip: sentences (BLIP, BLIP-2, GIT, Florence-2); wd14: booru tags (WD14 ONNX "
        "tagger); clip: phrases of a vocabulary ranked by CLIP (default blip)",
    )
    caption.add_argument(
        "--model",
        help="model folder, or a Hugging Face id already in the local cache (default: "
        "the captioner's usual model from the cache)",
    )
    caption.add_argument("--trigger", metavar="WORD", help="put WORD first in every new caption")
    caption.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "txt"],
        help="where captions go: metadata.csv or .txt files (default: what the folder uses)",
    )
    caption.add_argument("--overwrite", action="store_true", help="replace every existing caption, people's too")
    caption.add_argument(
        "--regenerate",
        action="store_true",
        help="replace captions lorad generated before that nobody edited (people's are kept)",
    )
    caption.add_argument("--caption-extension", default=".txt", help="sidecar extension (default .txt)")
    caption.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    caption.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a model whose weights exist only as pytorch_model.bin (a pickle; prefer safetensors)",
    )
    caption.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    caption.add_argument("--max-length", type=int, default=75, help="blip: most tokens per caption (default 75)")
    caption.add_argument("--beams", type=int, default=1, help="blip: beam search width (default 1, greedy)")
    caption.add_argument("--prompt", help='blip: text each caption continues, e.g. "a photo of"')
    caption.add_argument(
        "--general-threshold", type=float, default=0.35, help="wd14: lowest score of a general tag (default 0.35)"
    )
    caption.add_argument(
        "--character-threshold", type=float, default=0.85, help="wd14: lowest score of a character tag (default 0.85)"
    )
    caption.add_argument(
        "--exclude", action="append", metavar="TAGS", help="wd14: comma-separated tags never written (repeatable)"
    )
    caption.add_argument("--vocabulary", metavar="FILE", help="clip: your own phrase file (default: built-in)")
    caption.add_argument("--top-k", type=int, default=3, help="clip: phrases per vocabulary section (default 3)")
    caption.add_argument("--verbose", "-v", action="store_true", help="print every new caption")
    caption.add_argument("--embedded", action="store_true", help="caption in this process even if a daemon runs")
    caption.set_defaults(func=cmd_caption)

    serve = sub.add_parser(
        "serve",
        help="run the daemon: resident models, a job queue, gRPC API",
        description="Run the lorad daemon. Default: 127.0.0.1:47860 and a Unix socket in "
        "the state directory ($LORAD_HOME). Ctrl-C/SIGTERM checkpoints the running job, "
        "which resumes on the next start.",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="HOST:PORT or unix:/path (repeatable; replaces the defaults; env LORAD_ADDRESS). "
        "Every address requires the token (clients of this user read it from the state directory).",
    )
    # Kept so existing scripts still run: the token is required everywhere now.
    serve.add_argument("--require-token", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--keep-alive",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="keep a base model loaded this long after its last job (default 1800)",
    )
    serve.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GB",
        help="per device: unload least-recently-used idle models beyond this much memory",
    )
    serve.add_argument(
        "--cpu-workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on the CPU besides one per GPU (default 1): CPU jobs run side by side, or one "
        "job trains on several with `devices: N`",
    )
    serve.add_argument(
        "--in-process",
        action="store_true",
        help="run jobs in the daemon process instead of one worker process per device (for debugging: no crash "
        "isolation, one device per job)",
    )
    serve.add_argument(
        "--no-resume", action="store_true", help="do not resume jobs that were running when the daemon last stopped"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="the daemon's version, devices, queue and models")
    status.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", action="append", choices=sorted(STATE_CHOICES), help="only these states")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    jobs.set_defaults(func=cmd_jobs)

    logs = sub.add_parser("logs", help="a job's events (its whole history)")
    logs.add_argument("job", help="job id (or a unique prefix)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep following until the job ends")
    logs.set_defaults(func=cmd_logs)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job (a running job keeps its checkpoint)")
    cancel.add_argument("job", help="job id (or a unique prefix)")
    cancel.set_defaults(func=cmd_cancel)

    samples = sub.add_parser("samples", help="a job's sample images (step, prompt, seed, path), oldest first")
    samples.add_argument("job", help="job id (or a unique prefix)")
    samples.set_defaults(func=cmd_samples)

    sample_now = sub.add_parser(
        "sample-now", help="have a running job draw its sample prompts after its current step, and list them"
    )
    sample_now.add_argument("job", help="job id (or a unique prefix)")
    sample_now.set_defaults(func=cmd_sample_now)

    save_now = sub.add_parser(
        "save-now", help="have a running job save a checkpoint and its step's LoRA file after its current step"
    )
    save_now.add_argument("job", help="job id (or a unique prefix)")
    save_now.set_defaults(func=cmd_save_now)

    models = sub.add_parser("models", help="resident models; `load PATH` / `unload ID|PATH`")
    models.add_argument("action", nargs="?", choices=["list", "load", "unload"], default="list")
    models.add_argument("model", nargs="?", help="base model path / hub id (load) or model id / path (unload)")
    models.add_argument(
        "--keep-alive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with load: keep-alive after last use (default: the daemon's)",
    )
    models.set_defaults(func=cmd_models)

    watch = sub.add_parser(
        "watch",
        help="watched folders: new images are captioned and trained by the daemon",
        description="Drop images into a watched folder and the daemon captions them and "
        "trains a new version of the LoRA once the folder is quiet.",
    )
    watch_sub = watch.add_subparsers(dest="action", required=True, metavar="ACTION")
    watch_add = watch_sub.add_parser("add", help="watch a folder")
    watch_add.add_argument("dir", help="the folder of images")
    watch_add.add_argument("--config", required=True, metavar="FILE", help="training config used as the template")
    watch_add.add_argument(
        "--quiet-seconds",
        type=float,
        default=None,
        metavar="S",
        help="seconds without file changes before training (default 10)",
    )
    watch_add.add_argument(
        "--min-new-images",
        type=int,
        default=None,
        metavar="N",
        help="new images needed before a job is queued (default 1)",
    )
    watch_add.add_argument(
        "--mode",
        choices=["continue", "retrain"],
        default="continue",
        help="continue from the newest LoRA (default), or retrain from scratch",
    )
    watch_add.add_argument(
        "--continue-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of a continue job (default: the config's own budget)",
    )
    watch_add.add_argument(
        "--publish-dir", metavar="DIR", help="also copy the newest LoRA here, atomically (e.g. A1111's models/Lora)"
    )
    watch_add.add_argument("--polling", action="store_true", help="poll the folder (network drives)")
    watch_sub.add_parser("ls", help="the watched folders and their state")
    watch_rm = watch_sub.add_parser("rm", help="stop watching a folder (its queued jobs stay)")
    watch_rm.add_argument("watch", metavar="DIR|ID", help="the folder, or the watch id")
    watch_retry = watch_sub.add_parser(
        "retry", help="try a watch in error again now: its template config is read again, new images queue a job"
    )
    watch_retry.add_argument("watch", metavar="DIR|ID", help="the folder, or the watch id")
    watch.set_defaults(func=cmd_watch)

    config = sub.add_parser("config", help="print an annotated example config, or check one")
    group = config.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--example",
        nargs="?",
        const="sd",
        metavar="FAMILY",
        help="print every key of a model family's config with its help and default (sd, sdxl, llm, ...; default sd)",
    )
    group.add_argument("--check", metavar="FILE", help="validate a config and report every problem")
    config.set_defaults(func=cmd_config)

    tui = sub.add_parser(
        "tui",
        help="the terminal dashboard",
        description="The terminal dashboard of the running daemon: status, models, jobs "
        "with live progress and loss curves, submit and cancel. Finds the daemon as the other "
        "commands do ($LORAD_ADDRESS, $LORAD_HOME) and waits for one if none is running.",
    )
    tui.set_defaults(func=cmd_tui)

    demo = sub.add_parser("demo", help="train a tiny built-in model end to end (offline, < 1 min)")
    demo.add_argument("--dir", default="lorad-demo", help="work folder (default: ./lorad-demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 30; 40 with --llm)")
    demo.add_argument("--llm", action="store_true", help="train a LoRA on a tiny Llama instead (PEFT adapter)")
    demo.set_defaults(func=cmd_demo)

    webui = sub.add_parser("webui", help="the AUTOMATIC1111 WebUI extension (`webui install --webui-dir PATH`)")
    webui_sub = webui.add_subparsers(dest="webui_command", required=True, metavar="ACTION")
    webui_install = webui_sub.add_parser(
        "install",
        help="link (or copy) the extension into a WebUI's extensions/ folder",
        description="Add lorad's LoRA Training tab to AUTOMATIC1111 (or Forge / SD.Next): links "
        "clients/sd-webui-lorad into WEBUI_DIR/extensions/.",
    )
    webui_install.add_argument("--webui-dir", required=True, help="the WebUI folder (the one with launch.py)")
    webui_install.add_argument("--copy", action="store_true", help="copy instead of linking (re-run to update)")
    webui_install.set_defaults(func=cmd_webui_install)

    # LoRA file tools and exports (issue 21): `lorad lora ...`, `lorad export gguf ...`.
    from lorad.cli.lora_commands import add_lora_commands

    add_lora_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorad`` console script; returns the exit code."""
    # Never reach out to a model hub unless a command explicitly asks to.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_models and args.action in ("load", "unload") and not args.model:
        parser.error(f"`lorad models {args.action}` needs a MODEL")
    try:
        return args.func(args)
    except LoradError as err:
        _print_error(err)
        from lorad.errors import ConfigError

        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lorad logs JOB | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:
        # Errors from the daemon (lorad_client.LoradRpcError) carry the server's message and hint. The client
        # is imported by the commands that talk to a daemon, so only then can such an error occur.
        client_errors = sys.modules.get("lorad_client.errors")
        if client_errors is None or not isinstance(err, (client_errors.LoradRpcError, client_errors.DaemonUnavailable)):
            raise
        print(f"error: {err}", file=sys.stderr)
        code = getattr(err, "code", None)
        return EXIT_USAGE if getattr(code, "name", "") == "INVALID_ARGUMENT" else EXIT_FAILED
