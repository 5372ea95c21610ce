"""``lorad export gguf``: an LLM job's adapter and merged model as GGUF for llama.cpp, and an Ollama Modelfile.

The conversion is llama.cpp's own: ``convert_hf_to_gguf.py`` (base and merged models) and
``convert_lora_to_gguf.py`` (the adapter), run as separate processes from a llama.cpp source tree, with the
``gguf`` package of that tree; ``q4_k_m`` is made by llama.cpp's quantizer (``llama_model_quantize``
through llama-cpp-python). The tree comes from llama-cpp-python's source distribution on PyPI (it
vendors llama.cpp): ``scripts/llama_cpp_setup`` unpacks it into lorad's cache, or ``$LORAD_LLAMA_CPP``
/ ``--llama-cpp`` name any llama.cpp checkout. Everything that would fail is checked before work
starts: the architecture (against the converter's own list), DoRA, per-module ranks or alphas.

llama.cpp scales an adapter by alpha/rank; an rsLoRA adapter (alpha/sqrt(rank)) is converted from a
copy whose alpha gives the same scale that way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorad.errors import ExportError
from lorad.families.llm.modelfile import write_modelfile

QUANTS = ("f16", "q8_0", "q4_k_m")
# convert_hf_to_gguf --outtype for each quant; q4_k_m is quantized from f16 by llama.cpp afterwards.
_OUTTYPES = {"f16": "f16", "q8_0": "q8_0", "q4_k_m": "f16"}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h enum llama_ftype
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist scripts/llama_cpp_setup unpacks
CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


@dataclass(frozen=True)
class GgufExport:
    """What ``export_gguf`` wrote (paths as strings) and the command that runs it in Ollama."""

    folder: str
    adapter: str
    base: str
    merged: str | None
    modelfile: str
    ollama_command: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.folder}:", f"  adapter  {self.adapter}", f"  base     {self.base}"]
        if self.merged:
            lines.append(f"  merged   {self.merged}")
        lines += [f"  Modelfile {self.modelfile}", "", "run it in Ollama:", f"  {self.ollama_command}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def default_llama_cpp_dir() -> Path:
    """Where ``scripts/llama_cpp_setup`` unpacks llama.cpp's converters (the user's cache, not LORAD_HOME)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("lorad")) / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def find_llama_cpp(explicit: Path | None = None) -> Path:
    """A llama.cpp source folder with the converters: ``explicit``, ``$LORAD_LLAMA_CPP``, then the cache."""
    candidates = [explicit] if explicit else []
    if os.environ.get("LORAD_LLAMA_CPP"):
        candidates.append(Path(os.environ["LORAD_LLAMA_CPP"]))
    candidates.append(default_llama_cpp_dir())
    for folder in candidates:
        if folder and all((folder / name).is_file() for name in CONVERTERS):
            return folder
    raise ExportError(
        "llama.cpp's GGUF converters were not found (looked in: " + ", ".join(str(c) for c in candidates if c) + ")",
        "Run `scripts/llama_cpp_setup` (unpacks them from llama-cpp-python's source package on PyPI), or point "
        "--llama-cpp / $LORAD_LLAMA_CPP at a llama.cpp checkout.",
    )


def supported_architectures(llama_cpp: Path) -> set[str]:
    """The Hugging Face architectures (``LlamaForCausalLM``, ...) llama.cpp's converter knows, from its own code."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py'];"
        "import conversion; print(json.dumps(sorted(conversion.TEXT_MODEL_MAP)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(llama_cpp)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ExportError(
            f"llama.cpp's converter in {llama_cpp} cannot be loaded: {_tail(done.stderr)}",
            "Its Python requirements (torch, numpy, sentencepiece, transformers) must be installed: pip install "
            "'lorad[gguf]'.",
        )
    return set(json.loads(done.stdout))


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())


def _run(args: list[str], what: str, log: Callable[[str], None]) -> None:
    log(f"{what}: {' '.join(Path(a).name if i < 2 else a for i, a in enumerate(args))}")
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise ExportError(f"{what} failed: {_tail(done.stderr or done.stdout)}", "See the converter's message above.")


def _adapter_config(adapter: Path) -> dict:
    try:
        return json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ExportError(
            f"{adapter} has no readable adapter_config.json ({err})",
            "Point at an LLM job's output_dir (it holds adapter/ with the PEFT adapter).",
        ) from None


def _base_folder(config: dict, base_model: str | None, adapter: Path) -> Path:
    name = base_model or config.get("base_model_name_or_path") or ""
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ExportError(
            f"the base model {name!r} of {adapter} is not a local model folder (config.json + safetensors)",
            "Pass --base-model with the folder the adapter was trained on.",
        )
    return folder


def check_exportable(
    output_dir: Path, *, base_model: str | None, llama_cpp: Path | None
) -> tuple[Path, Path, dict, Path]:
    """(llama.cpp folder, base folder, adapter config, adapter folder); ExportError for anything that would fail."""
    adapter = Path(output_dir) / "adapter"
    config = _adapter_config(adapter)
    base = _base_folder(config, base_model, adapter)
    model_config = json.loads((base / "config.json").read_text())
    architecture = (model_config.get("architectures") or ["(none given)"])[0]
    tools = find_llama_cpp(llama_cpp)
    if architecture not in supported_architectures(tools):
        raise ExportError(
            f"llama.cpp cannot convert the architecture {architecture} (model_type "
            f"{model_config.get('model_type', '?')}) of {base}",
            "Serve the PEFT adapter with transformers/peft or vLLM instead; llama.cpp's converter lists the "
            "architectures it supports.",
        )
    if config.get("use_dora"):
        raise ExportError(
            f"{adapter} is a DoRA adapter; llama.cpp's LoRA format has no DoRA magnitudes",
            "Retrain with use_dora: false, or serve the merged model (merge_export: true).",
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(
            f"{adapter} has per-layer ranks or alphas; a llama.cpp adapter has one alpha", "Retrain without patterns."
        )
    return tools, base, config, adapter


def export_gguf(
    output_dir: Path,
    *,
    quant: str = "f16",
    base_model: str | None = None,
    merged: bool = True,
    llama_cpp: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> GgufExport:
    """Write ``output_dir/gguf/``: adapter, base and (optionally) merged GGUFs, and an Ollama Modelfile."""
    if quant not in QUANTS:
        raise ExportError(f"`--quant {quant}` is not supported", "Choose one of: " + ", ".join(QUANTS))
    output_dir = Path(output_dir)
    tools, base, config, adapter = check_exportable(output_dir, base_model=base_model, llama_cpp=llama_cpp)
    if quant == "q4_k_m":
        try:
            import llama_cpp
        except ImportError:
            raise ExportError(
                "q4_k_m is made by llama.cpp's quantizer, which needs llama-cpp-python",
                "pip install 'lorad[gguf]' (or run scripts/llama_cpp_setup), or export f16 / q8_0.",
            ) from None
    folder = output_dir / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=folder) as scratch:
        work = Path(scratch)
        source = adapter
        if config.get("use_rslora"):
            # llama.cpp scales by alpha/r; this alpha gives rsLoRA's alpha/sqrt(r).
            source = work / "adapter"
            shutil.copytree(adapter, source)
            rank = int(config["r"])
            config = config | {"lora_alpha": float(config["lora_alpha"]) * math.sqrt(rank), "use_rslora": False}
            (source / "adapter_config.json").write_text(json.dumps(config, indent=2))
            notes.append(
                "rsLoRA: the adapter GGUF's alpha is lora_alpha * sqrt(r), which llama.cpp's alpha/r turns into "
                "the trained scale"
            )
        adapter_out = folder / "adapter-f16.gguf"
        base_out = folder / f"base-{quant}.gguf"
        _run(
            [
                python,
                str(tools / "convert_lora_to_gguf.py"),
                str(source),
                "--base",
                str(base),
                "--outtype",
                "f16",
                "--outfile",
                str(work / adapter_out.name),
            ],
            "convert_lora_to_gguf",
            log,
        )
        _convert_model(tools, base, work / base_out.name, quant, work, log)
        merged_out = None
        if merged:
            merged_folder = output_dir / "merged"
            if not (merged_folder / "config.json").is_file():
                merged_folder = work / "merged"
                log("merging the adapter into the base model (peft, on the CPU)")
                merge_adapter(base, adapter, merged_folder)
            merged_out = folder / f"merged-{quant}.gguf"
            _convert_model(tools, merged_folder, work / merged_out.name, quant, work, log)
        for name in [adapter_out.name, base_out.name] + ([merged_out.name] if merged_out else []):
            os.replace(work / name, folder / name)
    modelfile = write_modelfile(folder, base_gguf=base_out.name, adapter_gguf=adapter_out.name, tokenizer_dir=adapter)
    name = (output_dir.name or "lorad-adapter").lower().replace(" ", "-")
    command = f"cd {folder} && ollama create {name} -f Modelfile && ollama run {name}"
    return GgufExport(
        str(folder),
        str(adapter_out),
        str(base_out),
        str(merged_out) if merged_out else None,
        str(modelfile),
        command,
        notes,
    )


def _convert_model(tools: Path, model: Path, dest: Path, quant: str, work: Path, log: Callable[[str], None]) -> None:
    outtype = _OUTTYPES[quant]
    target = dest if quant != "q4_k_m" else work / (dest.stem + "-f16.gguf")
    _run(
        [
            sys.executable,
            str(tools / "convert_hf_to_gguf.py"),
            str(model),
            "--outtype",
            outtype,
            "--outfile",
            str(target),
        ],
        "convert_hf_to_gguf",
        log,
    )
    if quant == "q4_k_m":
        quantize(target, dest, LLAMA_FTYPE_MOSTLY_Q4_K_M, log)
        target.unlink()


def quantize(source: Path, dest: Path, ftype: int, log: Callable[[str], None]) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``), through llama-cpp-python."""
    import llama_cpp

    log(f"llama_model_quantize {source.name} -> {dest.name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params) != 0:
        raise ExportError(f"llama.cpp could not quantize {source.name} to q4_k_m", "Export f16 or q8_0 instead.")


def merge_adapter(base: Path, adapter: Path, dest: Path) -> None:
    """The base with the adapter merged (peft's merge_and_unload), saved with the adapter's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(dest)
