"""AUTOMATIC1111 loads this file (the extension's only script): it registers lorad's "LoRA Training" tab.

A1111 caches modules by import name across extensions, so everything else lives in the uniquely
named package ``lorad_webui`` beside this folder. A1111 puts the extension folder on sys.path only
while it loads this file; once ``lorad_webui`` is imported its submodules are found through the
package itself, so the tab's later imports need no path.
"""

import sys
from pathlib import Path

_EXTENSION_DIR = str(Path(__file__).resolve().parent.parent)
if _EXTENSION_DIR not in sys.path:  # loaders that do not add it (Forge, SD.Next, tests)
    sys.path.append(_EXTENSION_DIR)

from lorad_webui.a1111 import register  # noqa: E402

register()
