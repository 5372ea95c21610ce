"""The ``lorad`` command's exit statuses, shared by every command."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's value for Ctrl-C: stopped on request, resumable
