"""Schedulers by their AUTOMATIC1111 names, so metadata reads the same everywhere."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import diffusers
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from diffusers.utils.torch_utils import randn_tensor

DEFAULT_SCHEDULER = "Default"  # the model's own scheduler, where a name is asked for
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
    as with eager kernels): they are remembered across calls. Euler a copies each step's noise to a CUDA device
    without waiting for it (noise_copied_without_waiting); PNDM and DDIM read each step's timestep from a host
    copy of the schedule (_timesteps_read_on_the_host)."""
    if isinstance(scheduler, diffusers.DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = seeds
    if isinstance(scheduler, diffusers.LMSDiscreteScheduler):
        scheduler.get_lms_coefficient = functools.partial(_remembered_lms_coefficient, scheduler)
    if isinstance(scheduler, diffusers.EulerAncestralDiscreteScheduler):
        scheduler.step = _step_without_waiting(scheduler.step)
    if isinstance(scheduler, (diffusers.PNDMScheduler, diffusers.DDIMScheduler)):
        _timesteps_read_on_the_host(scheduler)


def _timesteps_read_on_the_host(scheduler: Any) -> None:
    """PNDM and DDIM index their noise schedule with each step's timestep on the host, and diffusers' pipelines
    hand them that timestep as an element of the schedule on the pipeline's device: on a CUDA device every step
    then waited for the device to finish all it had queued before reading it. Their steps get the same timestep
    as a number instead, from a host copy made once when the schedule is set (the pipelines' timesteps are views
    of that schedule, txt2img's and img2img's alike, so a view's address says which one it is)."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step
    numbers: dict[int, int] = {}  # address of an element of the schedule on the device -> its value

    @functools.wraps(set_timesteps)
    def set_timesteps_with_host_copy(*args: Any, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)
        schedule = scheduler.timesteps  # held by the scheduler, so no other tensor can take these addresses
        numbers.clear()
        numbers.update(
            (element.data_ptr(), number) for element, number in zip(schedule, schedule.tolist(), strict=True)
        )

    @functools.wraps(step)
    def step_with_host_timestep(model_output: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 0:
            timestep = numbers.get(timestep.data_ptr(), timestep)
        return step(model_output, timestep, *args, **kwargs)

    scheduler.set_timesteps, scheduler.step = set_timesteps_with_host_copy, step_with_host_timestep


def _remembered_lms_coefficient(scheduler: Any, order: int, t: int, current_order: int) -> float:
    window = tuple(scheduler.sigmas[t - order + 1 : t + 2].tolist())  # the only sigmas the coefficient reads
    return _lms_coefficient(order, current_order, window, scheduler.sigmas.dtype)


@functools.lru_cache(maxsize=1 << 16)
def _lms_coefficient(order: int, current_order: int, window: tuple[float, ...], dtype: torch.dtype) -> float:
    """diffusers' own computation, on a stand-in that holds the window's sigmas (same values, same dtype)."""
    stand_in = SimpleNamespace(sigmas=torch.tensor(window, dtype=dtype))
    return diffusers.LMSDiscreteScheduler.get_lms_coefficient(stand_in, order, order - 1, current_order)


def _step_without_waiting(step: Any) -> Any:
    """Euler a's `step`, drawing its noise with noise_copied_without_waiting (diffusers' pipelines read the
    step's signature, which the wrapper keeps)."""

    @functools.wraps(step)
    def step_without_waiting(*args: Any, **kwargs: Any) -> Any:
        scheduling_euler_ancestral_discrete.randn_tensor = noise_copied_without_waiting
        try:
            return step(*args, **kwargs)
        finally:
            scheduling_euler_ancestral_discrete.randn_tensor = randn_tensor

    return step_without_waiting


def noise_copied_without_waiting(
    shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
) -> torch.Tensor:
    """diffusers' randn_tensor: the same numbers, but noise drawn by CPU generators for a CUDA device is copied
    there without the host waiting for the device to finish what it has queued. Euler a draws noise at every
    step, and diffusers' blocking copy made the host wait for each step's UNet call, so the device then sat idle
    while the host queued the next step (the engine keeps the host one step ahead instead)."""
    first = generator[0] if isinstance(generator, list) else generator
    if first is None or first.device.type != "cpu" or torch.device(device or "cpu").type != "cuda":
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype, layout=layout)
    return noise.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned copy until the copy is done
