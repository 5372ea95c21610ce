"""Network types (LoCon, LoHa, LoKr, DoRA): each file is read by real consumers (the lycoris-lora package's
own loader, diffusers where it supports the type, A1111's rules) and gives the weight change the training
module computed; every key maps to an A1111 module; a resident base model is left bit-identical."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lorad.config import parse_config
from lorad.errors import ConfigError
from lorad.lora.adapters import detach_lora, load_lora_state_dict, lora_state_dict
from lorad.lora.kohya_format import PREFIXES, kohya_module_name, portable_path
from lorad.lora.lycoris_adapter import lycoris_network, set_lycoris_training
from lorad.lora.networks import NetworkSpec, attach_network
from lorad.lora.targets import resnet_layer_paths
from lorad.models.tiny import write_original_checkpoint
from lorad.training.loop import train
from tests.support.a1111 import a1111_compvis_name, ldm_module_names
from tests.support.datasets import make_dataset, tiny_train_values

LYCORIS_TYPES = ("locon", "loha", "lokr", "dora")
# Per type: settings that exercise its file layouts (LoKr rank 2 decomposes w2 into lokr_w2_a/_b on the
# 64-wide layers and keeps a full lokr_w2 elsewhere; conv_dim gives LoHa/LoKr/DoRA the 3x3 convolutions).
SETTINGS = {
    "locon": {"conv_dim": 2, "conv_alpha": 1},
    "loha": {"conv_dim": 2},
    "lokr": {"lora_rank": 2, "conv_dim": 2},
    "dora": {"conv_dim": 2, "lora_alpha": 2},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> dict[str, Path]:
    """One short run per network type (text encoder too, fp32 files, a high rate so every weight moves)."""
    root = tmp_path_factory.mktemp("networks")
    data = make_dataset(root / "data")
    files = {}
    for kind in ("lora", *LYCORIS_TYPES):
        values = tiny_train_values(
            tiny_sd,
            data,
            root / kind,
            network_type=kind,
            train_text_encoder=True,
            save_precision="fp32",
            learning_rate="2e-2",
            epochs=2,
            **SETTINGS.get(kind, {}),
        )
        files[kind] = Path(train(parse_config(values, base_dir=root)).outputs["kohya"])
    return files


def fresh_models(tiny_sd: Path) -> tuple[nn.Module, nn.Module]:
    from lorad.families.sd.family import load_for_training
    from lorad.training.placement import pick_placement

    components = load_for_training(str(tiny_sd), pick_placement("cpu", "no"))
    return components.unet.eval(), components.text_encoder.eval()


def probe(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=generator)
    return torch.randn(3, layer.in_features, generator=generator)


def apply_delta(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The output change a weight change ``delta`` makes to ``layer`` on ``x``."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, delta.reshape(layer.weight.shape), None, layer.stride, layer.padding)
    return F.linear(x, delta.reshape(layer.weight.shape))


def lycoris_load(file: Path, roots: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The file read by the lycoris-lora package's own loader functions, as ``create_network_from_weights``
    uses them: ``get_module`` detects each layer's algorithm from its keys, ``make_module`` builds the
    module from the weights (that function's network constructor trips over diffusers' UNet in lycoris 4.1,
    so the per-layer loop is repeated here with kohya's name rule)."""
    from lycoris.modules import get_module, make_module

    weights = load_file(str(file))
    modules = {}
    for prefix, root in roots.items():
        for path, layer in root.named_modules():
            name = f"{prefix}_{path}".replace(".", "_")
            if any(key.startswith(name + ".") for key in weights):
                algo, params = get_module(weights, name)
                modules[name] = make_module(algo, params, name, layer)
    return modules


def trained_module_changes(tiny_sd: Path, file: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Attach ``kind`` with lorad's own training module, load the file's weights into it, and return the
    output change each adapted layer makes on its probe (keyed by the file's layer name)."""
    unet, te = fresh_models(tiny_sd)
    tensors = load_file(str(file))
    names = {key.partition(".")[0] for key in tensors}
    changes, layers = {}, {}
    for part, model in (("unet", unet), ("text_encoder", te)):
        by_name = {
            kohya_module_name(PREFIXES[part], portable_path(part, p)): p
            for p, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
        }
        paths = sorted(by_name[n] for n in names if n in by_name)
        meta = json.loads(safe_open(str(file), "pt").metadata()["ss_network_args"])
        spec = NetworkSpec(
            network_type=kind,
            rank=int(safe_open(str(file), "pt").metadata()["ss_network_dim"]),
            alpha=float(safe_open(str(file), "pt").metadata()["ss_network_alpha"]),
            conv_rank=int(meta["conv_dim"]) if "conv_dim" in meta else None,
            conv_alpha=float(meta["conv_alpha"]) if "conv_alpha" in meta else None,
        )

        def name_of(path: str, part: str = part) -> str:
            return kohya_module_name(PREFIXES[part], portable_path(part, path))

        attach_network(model, adapter_name="probe", target_paths=paths, spec=spec, lora_name=name_of)
        own = {k: v for k, v in tensors.items() if k.partition(".")[0] in {name_of(p) for p in paths}}
        load_lora_state_dict(model, "probe", own)
        set_lycoris_training(model, "probe", False)
        for path in paths:
            layer = model.get_submodule(path)
            x = probe(layer)
            with torch.no_grad():
                changes[name_of(path)] = layer(x) - type(layer).forward(layer, x)
            layers[name_of(path)] = layer
    return changes, layers


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_lycoris_loader_merges_the_delta_the_training_module_computed(
    trained: dict[str, Path], tiny_sd: Path, kind: str
) -> None:
    file = trained[kind]
    changes, layers = trained_module_changes(tiny_sd, file, kind)
    unet, te = fresh_models(tiny_sd)
    holder = nn.Module()
    holder.text_model = te  # lycoris names text-encoder layers from text_model.… as A1111 does
    modules = lycoris_load(file, {"lora_unet": unet, "lora_te": holder})
    assert modules.keys() == changes.keys()  # every layer of the file found its module, none extra
    assert any(isinstance(layers[n], nn.Conv2d) and layers[n].kernel_size == (3, 3) for n in modules)
    for name, module in modules.items():
        module.eval()
        merged, _ = module.get_merged_weight(multiplier=1.0, shape=module.org_weight.shape)
        delta = merged - module.org_weight
        want = changes[name]
        assert want.abs().max() > 0, name  # the layer really trained
        assert torch.allclose(apply_delta(layers[name], probe(layers[name]), delta), want, atol=1e-5), name


def a1111_dora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float, dora_scale: torch.Tensor, w: torch.Tensor):
    """A1111's network_lora + NetworkModule.finalize_updown with dora_scale (extensions-builtin/Lora): the
    update up@down scaled by alpha/rank, then W' = (W + ΔW) · dora_scale / ‖W + ΔW‖ per input column."""
    updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    merged = updown + w
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm) - w


@pytest.mark.slow
def test_dora_file_is_applied_by_a1111_rules_as_trained(trained: dict[str, Path], tiny_sd: Path) -> None:
    file = trained["dora"]
    changes, layers = trained_module_changes(tiny_sd, file, "dora")
    tensors = load_file(str(file))
    unet, te = fresh_models(tiny_sd)
    originals = {}
    for part, model in (("unet", unet), ("text_encoder", te)):
        for p, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                originals[kohya_module_name(PREFIXES[part], portable_path(part, p))] = m.weight.detach()
    assert changes
    for name, want in changes.items():
        scale = tensors[f"{name}.dora_scale"]
        w = originals[name]
        assert scale.shape == (1, w.shape[1], *[1] * (w.dim() - 2))  # per input channel, as A1111 reads it
        delta = a1111_dora_delta(
            tensors[f"{name}.lora_up.weight"],
            tensors[f"{name}.lora_down.weight"],
            float(tensors[f"{name}.alpha"]),
            scale,
            w,
        )
        got = apply_delta(layers[name], probe(layers[name]), delta)
        assert torch.allclose(got, want, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_diffusers_loads_lora_and_locon_files_with_the_trained_delta(
    trained: dict[str, Path], tiny_sd: Path, kind: str
) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    file = trained[kind]
    changes, _ = trained_module_changes(tiny_sd, file, kind) if kind != "lora" else (None, None)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(file), adapter_name="mine")
    seen = set()
    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer) or "mine" not in layer.lora_A:
                continue
            name = kohya_module_name(PREFIXES[part], portable_path(part, path))
            seen.add(name)
            if changes is None:
                continue
            base = layer.get_base_layer()
            x = probe(base)
            with torch.no_grad():
                got = layer(x) - base(x)
            assert torch.allclose(got, changes[name], atol=1e-5), name
    in_file = {k.partition(".")[0] for k in load_file(str(file))}
    assert seen == in_file  # diffusers placed every layer of the file
    if kind == "locon":
        assert any("resnets" in n and n.endswith("conv1") for n in seen)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", *LYCORIS_TYPES])
def test_every_key_of_each_type_maps_to_an_a1111_module(
    trained: dict[str, Path], tiny_sd: Path, tmp_path: Path, kind: str
) -> None:
    single = write_original_checkpoint(tiny_sd, tmp_path / "tiny.safetensors")
    known = ldm_module_names(single)
    unet_config = json.loads((tiny_sd / "unet" / "config.json").read_text())
    per = unet_config["layers_per_block"] + 1
    with safe_open(str(trained[kind]), "pt") as fh:
        modules = {k.split(".")[0] for k in fh.keys()}  # noqa: SIM118
        meta = fh.metadata()
    assert meta["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")
    if kind != "lora":
        args = json.loads(meta["ss_network_args"])
        assert args["algo"] == {"locon": "lora", "dora": "lora"}.get(kind, kind)
        assert ("dora_wd" in args) == (kind == "dora")
    unmatched = sorted(m for m in modules if a1111_compvis_name(m, per, unet_config) not in known)
    assert unmatched == []
    if kind != "lora":
        assert any("downsamplers" in m for m in modules) and any("upsamplers" in m for m in modules)


@pytest.mark.slow
@pytest.mark.parametrize("kind", LYCORIS_TYPES)
def test_resident_model_is_bit_identical_after_a_lycoris_run(
    tmp_path: Path, tiny_sd: Path, dataset: Path, kind: str
) -> None:
    from lorad.families.sd.family import load_for_training
    from lorad.training.family import ProvidedModel
    from lorad.training.placement import pick_placement

    components = load_for_training(str(tiny_sd), pick_placement("cpu", "no"))
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}

    @contextmanager
    def resident(config, placement):
        yield ProvidedModel(model=components, resident=True, seconds=0.0)

    values = tiny_train_values(
        tiny_sd,
        dataset,
        tmp_path / "out",
        network_type=kind,
        train_text_encoder=True,
        gradient_checkpointing=True,
        **SETTINGS[kind],
    )
    train(parse_config(values, base_dir=tmp_path), models=resident)
    after = components.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for model in (components.unet, components.text_encoder):
        assert lycoris_network(model, "lorad_run") is None
        # Every layer calls its class's own forward again: no wrapper left behind.
        assert not [p for p, m in model.named_modules() if "forward" in m.__dict__ or hasattr(m, "_lycoris_wrappers")]


@pytest.mark.slow
def test_lycoris_run_resumes_exactly(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    import threading

    from lorad.errors import TrainingInterrupted
    from lorad.events import StepDone

    common = {
        "network_type": "loha",
        "conv_dim": 2,
        "rank_dropout": 0.3,
        "module_dropout": 0.2,
        "epochs": 3,
        "save_steps": 2,
        "save_precision": "fp32",
        "train_text_encoder": True,
        "ema_decay": 0.8,  # the EMA is part of the checkpoint too
    }

    def config(out: str, **more: object):
        return parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / out, **common, **more), base_dir=tmp_path)

    full = train(config("full"))
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted):
        train(
            config("part"),
            stop=stop,
            on_event=lambda e: stop.set() if isinstance(e, StepDone) and e.step == 5 else None,
        )
    resumed = train(config("part", resume_from="latest"))
    for role in ("kohya", "kohya_ema"):
        a, b = load_file(full.outputs[role]), load_file(resumed.outputs[role])
        assert a.keys() == b.keys() and any(k.endswith("hada_w2_a") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), role


def test_dropouts_act_in_training_only_and_module_dropout_skips_the_adapter(tiny_sd: Path) -> None:
    unet, _ = fresh_models(tiny_sd)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(path)
    spec = NetworkSpec(network_type="locon", rank=4, alpha=4, rank_dropout=0.5)
    attach_network(unet, adapter_name="a", target_paths=[path], spec=spec, lora_name=lambda p: "lora_unet_x")
    with torch.no_grad():
        for param in lycoris_network(unet, "a").parameters():
            param.normal_()
    x = probe(layer)
    set_lycoris_training(unet, "a", True)
    torch.manual_seed(1)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, second)  # a different half of the ranks each call
    set_lycoris_training(unet, "a", False)
    assert torch.equal(layer(x), layer(x))
    detach_lora(unet, "a")

    skip = NetworkSpec(network_type="loha", rank=4, alpha=4, module_dropout=1.0)
    attach_network(unet, adapter_name="b", target_paths=[path], spec=skip, lora_name=lambda p: "lora_unet_x")
    with torch.no_grad():
        for param in lycoris_network(unet, "b").parameters():
            param.normal_()
    set_lycoris_training(unet, "b", True)
    assert torch.equal(layer(x), type(layer).forward(layer, x))  # always skipped while training
    set_lycoris_training(unet, "b", False)
    assert not torch.allclose(layer(x), type(layer).forward(layer, x))
    detach_lora(unet, "b")
    assert "forward" not in layer.__dict__


def test_state_dict_round_trip_for_checkpoints(tiny_sd: Path) -> None:
    unet, _ = fresh_models(tiny_sd)
    paths = resnet_layer_paths(unet)[:3]
    spec = NetworkSpec(network_type="lokr", rank=2, alpha=1, conv_rank=2, conv_alpha=1)
    attach_network(
        unet, adapter_name="a", target_paths=paths, spec=spec, lora_name=lambda p: "lora_unet_" + p.replace(".", "_")
    )
    state = {k: v if k.endswith(".alpha") else torch.randn_like(v) for k, v in lora_state_dict(unet, "a").items()}
    load_lora_state_dict(unet, "a", state)
    again = lora_state_dict(unet, "a")
    assert all(torch.equal(again[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="no adapter"):
        load_lora_state_dict(unet, "a", {"lora_unet_nothing.lokr_w1": torch.zeros(1)})
    detach_lora(unet, "a")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"conv_dim": 4}, "conv_dim"),
        ({"rank_dropout": 0.1}, "rank_dropout"),
        ({"network_type": "loha", "lora_dropout": 0.1}, "lora_dropout"),
        ({"network_type": "lokr", "conv_alpha": 2}, "conv_alpha"),
        ({"network_type": "lohha"}, "network_type"),
    ],
)
def test_network_settings_that_do_not_fit_the_type_are_config_errors(
    tmp_path: Path, tiny_sd: Path, dataset: Path, overrides: dict, key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / "o", **overrides), base_dir=tmp_path)
    assert [p.key for p in err.value.problems] == [key]
    if key == "network_type":
        assert "did you mean `loha`" in err.value.problems[0].fix
