"""Training config: the typed, frozen :class:`TrainConfig` and the one way to build it."""

from lorad.config.example import render_example
from lorad.config.loader import load_config, parse_config, parse_config_text
from lorad.config.schema import RepeatPolicy, TrainConfig

__all__ = ["RepeatPolicy", "TrainConfig", "load_config", "parse_config", "parse_config_text", "render_example"]
