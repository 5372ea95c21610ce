"""The ``lorad`` command: argument parsing and commands (``main``), in-process training
(``local_training``), the commands that talk to a daemon (``daemon_commands``), the terminal
progress display, the demo and the WebUI extension installer."""

from lorad.cli.main import main

__all__ = ["main"]
