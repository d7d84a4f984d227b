"""Schedulers by their AUTOMATIC1111 names, so metadata reads the same everywhere."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import diffusers
import torch

# A1111 name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler of the named kind, built on a model's own scheduler config."""
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)


def scheduler_name(scheduler: Any) -> str:
    """The A1111 name of a scheduler instance (the first table entry that matches it)."""
    class_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, (candidate, extra) in SCHEDULERS.items():
        if candidate == class_name and extra.get("use_karras_sigmas", False) == karras:
            return name
    return class_name


def prepare_for_call(scheduler: Any, seeds: list[int]) -> None:
    """Ready a fresh scheduler for one pipeline call whose images have `seeds`.

    DPM++ SDE draws its noise from Brownian trees of its own rather than from the pipeline's generators, and
    without a seed of its own from torch's global generator (the same seed then gave another picture each time):
    one tree per image, seeded with that image's seed. LMS integrates its coefficients numerically at every step
    (85 ms of host time for 30 steps on a CPU; on a GPU it adds up wherever the host is what the steps wait for,
    as with eager kernels): they are remembered across calls."""
    if isinstance(scheduler, diffusers.DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = seeds
    if isinstance(scheduler, diffusers.LMSDiscreteScheduler):
        scheduler.get_lms_coefficient = functools.partial(_remembered_lms_coefficient, scheduler)


def _remembered_lms_coefficient(scheduler: Any, order: int, t: int, current_order: int) -> float:
    window = tuple(scheduler.sigmas[t - order + 1 : t + 2].tolist())  # the only sigmas the coefficient reads
    return _lms_coefficient(order, current_order, window, scheduler.sigmas.dtype)


@functools.lru_cache(maxsize=1 << 16)
def _lms_coefficient(order: int, current_order: int, window: tuple[float, ...], dtype: torch.dtype) -> float:
    """diffusers' own computation, on a stand-in that holds the window's sigmas (same values, same dtype)."""
    stand_in = SimpleNamespace(sigmas=torch.tensor(window, dtype=dtype))
    return diffusers.LMSDiscreteScheduler.get_lms_coefficient(stand_in, order, order - 1, current_order)
