"""The samplers a sample image can be drawn with: diffusers' schedulers, built from the base model's own
noise-schedule config, and the names A1111 writes in its PNG info for them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Config spellings (kohya's sample_sampler names where kohya has one) → the sampler.
DENOISING_SAMPLERS = ("euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim")
FLOW_SAMPLERS = ("flow_match_euler",)
SAMPLER_CHOICES = DENOISING_SAMPLERS + FLOW_SAMPLERS
# Other names kohya and A1111 use for the same samplers.
ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "euler a": "euler_a",
    "dpmsolver++": "dpm++_2m",
    "dpm++ 2m": "dpm++_2m",
    "dpm++ 2m karras": "dpm++_2m_karras",
    "flow match euler": "flow_match_euler",
}


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler: its diffusers scheduler class, extra settings, A1111's label, and whether it is for
    flow-matching models (Flux) rather than denoising-diffusion ones (SD, SDXL)."""

    scheduler: str
    label: str
    options: tuple[tuple[str, Any], ...] = ()
    flow: bool = False


_DPM = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
SAMPLERS: Mapping[str, SamplerInfo] = {
    "euler": SamplerInfo("EulerDiscreteScheduler", "Euler"),
    "euler_a": SamplerInfo("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++_2m": SamplerInfo("DPMSolverMultistepScheduler", "DPM++ 2M", (("algorithm_type", "dpmsolver++"),)),
    "dpm++_2m_karras": SamplerInfo(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M Karras",
        (("algorithm_type", "dpmsolver++"), ("use_karras_sigmas", True)),
    ),
    "ddim": SamplerInfo("DDIMScheduler", "DDIM"),
    "flow_match_euler": SamplerInfo("FlowMatchEulerDiscreteScheduler", "Euler", flow=True),
}


def sampler_name(text: str) -> str | None:
    """A sampler's config name from how a person wrote it (case, spaces, kohya/A1111 aliases); None if unknown."""
    normal = " ".join(text.strip().lower().split())
    normal = ALIASES.get(normal, normal).replace(" ", "_")
    return normal if normal in SAMPLERS else None


def sampler_problem(text: str, *, flow: bool) -> str | None:
    """Why ``text`` cannot sample this kind of model (None when it can)."""
    name = sampler_name(text)
    if name is None:
        return f"is not a sampler lorad knows; choose one of: {', '.join(SAMPLER_CHOICES)}"
    if SAMPLERS[name].flow != flow:
        allowed = FLOW_SAMPLERS if flow else DENOISING_SAMPLERS
        kind = "a flow-matching" if flow else "a denoising-diffusion"
        return f"does not sample {kind} model; choose one of: {', '.join(allowed)}"
    return None


def build_sampler(name: str, scheduler_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler for sampler ``name`` (a config name or alias), configured from the base
    model's training scheduler config (its betas, prediction type, timestep spacing). A new object per
    image: schedulers keep per-run state (step index, solver history)."""
    import diffusers

    info = SAMPLERS[sampler_name(name) or name]
    cls = getattr(diffusers, info.scheduler)
    return cls.from_config(dict(scheduler_config), **dict(info.options))


def sampler_label(name: str) -> str:
    """A1111's name of the sampler, as its PNG info writes it ("Euler a", "DPM++ 2M Karras")."""
    return SAMPLERS[sampler_name(name) or name].label
