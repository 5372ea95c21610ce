"""Helpers the test modules share: data and configs, daemons, the CLI, the TUI's fakes, A1111's name
rules, LoRA files. Fixtures live in tests/conftest.py; test modules import these, never each other."""
