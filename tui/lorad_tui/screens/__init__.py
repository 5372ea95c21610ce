"""The TUI's screens: dashboard, job detail, submit, help, the daemon-down screen, and a yes/no box."""
