"""The base causal LM and the run's tokenizer: loading, and leaving a resident model as it was found."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.pickle_policy import pickle_problem
from lorad.errors import ConfigError, ConfigProblem, ModelLoadError
from lorad.lora.adapters import detach_lora
from lorad.textdata.templates import TemplateError, resolve_template
from lorad.training.activation_checkpointing import disable_activation_checkpointing, is_activation_checkpointing
from lorad.training.placement import Placement


@dataclass
class LlmModel:
    """A loaded causal LM as the registry holds it (``source``/``model_version`` describe it)."""

    model: nn.Module
    source: str
    model_version: str  # the architecture, e.g. "LlamaForCausalLM"
    use_cache: bool = field(init=False)  # the model's own KV-cache setting, put back after each run

    def __post_init__(self) -> None:
        self.use_cache = bool(getattr(self.model.config, "use_cache", True))


@dataclass(frozen=True)
class RunTokenizer:
    """The run's own copy of the tokenizer, with the chat template and pad id it trains with."""

    tokenizer: object
    pad_id: int
    notes: tuple[str, ...]  # decisions made for the user, shown as log lines


def load_llm(
    base_model: str, placement: Placement, *, load_in_4bit: bool = False, allow_pickle: bool = False
) -> LlmModel:
    """Load a causal LM from a local folder (or the local hub cache; nothing is downloaded), frozen,
    in eval mode, on the placement's device and weight dtype. ``load_in_4bit``: QLoRA's NF4 base.
    Weights come only from safetensors unless ``allow_pickle`` (pytorch_model.bin is a pickle)."""
    from transformers import AutoModelForCausalLM

    problem = pickle_problem("base_model", base_model, allow_pickle)
    if problem is not None:
        raise ModelLoadError(f"`base_model`: {problem.message}", problem.fix)
    kwargs: dict = {"dtype": placement.weight_dtype, "use_safetensors": None if allow_pickle else True}
    if load_in_4bit:
        if placement.device.type != "cuda":
            raise ConfigError(
                [
                    ConfigProblem(
                        "load_in_4bit",
                        f"needs a CUDA GPU; this run is on {placement.device}",
                        "set load_in_4bit: false (train the full-precision base), or run on "
                        "a machine with an NVIDIA GPU",
                    )
                ]
            )
        from transformers import BitsAndBytesConfig

        compute = placement.autocast_dtype or torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": placement.device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).split("\n")[0]
        raise ModelLoadError(
            f"`base_model`: cannot load {base_model} as a causal language model ({first_line})",
            "point base_model at a folder with config.json and *.safetensors, or a hub id that is already downloaded",
        ) from None
    if not load_in_4bit:
        model.to(placement.device)
    model.requires_grad_(False)
    model.eval()
    architecture = (model.config.architectures or [type(model).__name__])[0]
    return LlmModel(model=model, source=base_model, model_version=architecture)


def prepare_tokenizer(config: LlmTrainConfig) -> RunTokenizer:
    """The tokenizer for this run: a private copy with the chosen chat template and a pad id.

    Pad choice: we never add a token (that would resize the embeddings, change the base weights
    and make the adapter unloadable on the stock model). A tokenizer without a pad token pads
    with its UNK token when it has one that is not EOS, else with EOS itself. Either is safe here
    because padding is masked by position (attention mask and labels come from sample lengths,
    never from comparing ids to pad_token_id), so real EOS tokens always keep their labels and the
    model learns to stop. The saved tokenizer gets the same pad token, for batched inference.
    """
    from transformers import AutoTokenizer

    where = str(config.tokenizer_path or config.base_model)
    try:
        tokenizer = copy.deepcopy(AutoTokenizer.from_pretrained(where, local_files_only=True))
    except (OSError, ValueError) as err:
        key = "tokenizer_path" if config.tokenizer_path else "base_model"
        raise ConfigError(
            [
                ConfigProblem(
                    key,
                    f"no tokenizer could be loaded from {where} ({err})".split("\n")[0],
                    "use a model folder with tokenizer.json, or set tokenizer_path",
                )
            ]
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            [
                ConfigProblem(
                    "tokenizer_path",
                    f"the tokenizer in {where} is a slow (Python) tokenizer",
                    "use a folder with tokenizer.json: lorad needs token offsets to mask prompts exactly",
                )
            ]
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            [
                ConfigProblem(
                    "base_model",
                    f"the tokenizer in {where} has no EOS token",
                    "use a tokenizer that defines eos_token, or the model could never stop",
                )
            ]
        )
    notes: list[str] = []
    try:
        tokenizer.chat_template = resolve_template(config.chat_template, getattr(tokenizer, "chat_template", None))
    except TemplateError:
        raise ConfigError(
            [
                ConfigProblem(
                    "chat_template",
                    f"is `tokenizer`, but the tokenizer in {where} has no chat template",
                    "set chat_template: chatml (or llama2, alpaca)",
                )
            ]
        ) from None
    if tokenizer.pad_token_id is None:
        unk = tokenizer.unk_token_id
        if unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
            notes.append(f"the tokenizer has no pad token; padding with {tokenizer.unk_token!r} (not EOS)")
        else:
            tokenizer.pad_token = tokenizer.eos_token
            notes.append(
                "the tokenizer has no pad token; padding with EOS, masked by position so EOS is still trained on"
            )
    return RunTokenizer(tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id), notes=tuple(notes))


def restore_base_llm(model: nn.Module, adapter_name: str, *, use_cache: bool) -> None:
    """Leave a (possibly resident, shared) model as the run found it: adapter removed, gradient
    checkpointing off, eval mode, its cache setting back. Safe when nothing was changed."""
    if is_activation_checkpointing(model):
        disable_activation_checkpointing(model)
    model.config.use_cache = use_cache
    model.eval()
    detach_lora(model, adapter_name)
