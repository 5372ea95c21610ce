"""The extension inside a stand-in AUTOMATIC1111: its script loaded the way A1111 loads extension
scripts, in a venv with A1111's gradio 3.41.2 and protobuf 3.20.x, registers the tab and settings,
reads A1111's folders and checkpoints, refreshes the LoRA list; install.py installs only grpcio."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.webui_env import EXTENSION_DIR, a1111_python, run_python

# Just the parts of A1111's API the extension uses, with A1111's names and signatures.
FAKE_A1111 = {
    "modules/__init__.py": "",
    "modules/script_callbacks.py": (
        "ui_tabs_callbacks, ui_settings_callbacks = [], []\n"
        "def on_ui_tabs(callback): ui_tabs_callbacks.append(callback)\n"
        "def on_ui_settings(callback): ui_settings_callbacks.append(callback)\n"
    ),
    "modules/shared.py": (
        "import types\n"
        "class OptionInfo:\n"
        "    def __init__(self, default=None, label='', component=None, component_args=None, onchange=None,\n"
        "                 section=None, refresh=None):\n"
        "        self.default, self.label, self.section = default, label, section\n"
        "class Options:\n"
        "    def __init__(self): self.data, self.data_labels = {}, {}\n"
        "    def add_option(self, key, info):\n"
        "        self.data_labels[key] = info\n"
        "        self.data.setdefault(key, info.default)\n"
        "opts = Options()\n"
        "cmd_opts = types.SimpleNamespace(lora_dir=None)\n"
    ),
    "modules/sd_models.py": (
        "class CheckpointInfo:\n"
        "    def __init__(self, filename): self.filename = filename\n"
        "checkpoints_list = {'v1-5-pruned.safetensors [6ce0161689]': CheckpointInfo('/sd/v1-5-pruned.safetensors'),\n"
        "                    'sub/anime.ckpt [aa11bb22cc]': CheckpointInfo('/sd/sub/anime.ckpt')}\n"
        "def checkpoint_tiles(use_short=False): return list(checkpoints_list)\n"
    ),
    "modules/paths_internal.py": "models_path = '/webui/models'\ndata_path = '/webui'\n",
    "launch.py": (
        "installed, pip_calls = {'protobuf'}, []\n"
        "def is_installed(package): return package in installed\n"
        "def run_pip(command, desc=None, live=False): pip_calls.append(command)\n"
    ),
    # The built-in Lora extension's module, as A1111 leaves it in sys.modules.
    "networks.py": "refreshed = []\ndef list_available_networks(): refreshed.append(True)\n",
}

DRIVER = """
import importlib.util, json, runpy, sys
webui, ext = sys.argv[1], sys.argv[2]
sys.path.insert(0, webui)
import gradio as gr, networks
from google.protobuf import __version__ as protobuf_version
from modules import script_callbacks, shared

# What modules/scripts.py does: the extension folder on sys.path only while its script loads.
syspath = sys.path
sys.path = [ext] + sys.path
spec = importlib.util.spec_from_file_location("lorad_training_tab.py", ext + "/scripts/lorad_training_tab.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.path = syspath

for callback in script_callbacks.ui_settings_callbacks:
    callback()
tabs = [tab for callback in script_callbacks.ui_tabs_callbacks for tab in callback()]
from lorad_webui.a1111 import A1111Host
host = A1111Host()
default_lora_dir = str(host.lora_dir())
shared.cmd_opts.lora_dir = "/elsewhere/Lora"
shared.opts.data["lorad_address"] = "10.0.0.5:47860"
host.refresh_loras()
runpy.run_path(ext + "/install.py")
import launch
print(json.dumps({
    "gradio": gr.__version__, "protobuf": protobuf_version,
    "tabs": [[type(blocks).__name__, title, elem_id] for blocks, title, elem_id in tabs],
    "settings": {key: [info.default, info.section] for key, info in shared.opts.data_labels.items()},
    "lora_dir": [default_lora_dir, str(host.lora_dir())], "work_dir": str(host.work_dir()),
    "checkpoints": host.checkpoints(), "address": host.daemon_address(), "refreshed": len(networks.refreshed),
    "pip": launch.pip_calls,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lorad", "lorad_api", "lorad_client")),
}))
"""


def test_the_script_registers_the_tab_and_settings_in_a_stand_in_webui(tmp_path: Path) -> None:
    webui = tmp_path / "webui"
    for rel, text in FAKE_A1111.items():
        (webui / rel).parent.mkdir(parents=True, exist_ok=True)
        (webui / rel).write_text(text)
    result = run_python(a1111_python(), DRIVER, str(webui), str(EXTENSION_DIR))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gradio"] == "3.41.2" and report["protobuf"].startswith("3.20.")
    assert report["tabs"] == [["Blocks", "LoRA Training", "lorad_training"]]
    assert report["settings"] == {
        "lorad_address": ["", ["lorad", "lorad (LoRA training)"]],
        "lorad_snippet_weight": [0.8, ["lorad", "lorad (LoRA training)"]],
    }
    assert report["lora_dir"] == ["/webui/models/Lora", "/elsewhere/Lora"]
    assert report["work_dir"] == "/webui/outputs/lorad"
    assert report["checkpoints"] == {
        "v1-5-pruned.safetensors [6ce0161689]": "/sd/v1-5-pruned.safetensors",
        "sub/anime.ckpt [aa11bb22cc]": "/sd/sub/anime.ckpt",
    }
    assert report["address"] == "10.0.0.5:47860" and report["refreshed"] == 1
    assert report["pip"] == ["install grpcio"]  # protobuf is there: never touched
    assert report["heavy"] == []
