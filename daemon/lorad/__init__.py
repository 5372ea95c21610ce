"""lorad: a local LoRA training system (engine, and later daemon and clients).

Importing this package is cheap: it never imports torch. Heavy modules are imported by the
commands that need them.
"""

__version__ = "0.1.0"
