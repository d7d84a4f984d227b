"""Each scheduler's own host time in one request, as the engine runs it (a copy of a prototype built once, made
ready for the call): `set_timesteps` and the step calls of a request, the UNet's output stood in by the scaled
sample, at SD 1.5's latent size for 512x512 (1x4x64x64), on the CPU. On a GPU this is work the host does between UNet
calls: it adds to a request wherever the host is what the GPU waits for (eager kernels, a synchronisation per
step). The first run of each scheduler also does what a process does once (LMS's coefficients). Prints one JSON
document.

    python -m benchmarks.scheduler_steps                            # 30 steps, 64x64 latents, 5 runs
    python -m benchmarks.scheduler_steps --steps 3 --side 8 --runs 2  # checks the script
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from typing import Any

import diffusers
import torch

from dreamsketch.schedulers import SCHEDULERS, make_scheduler, prepare_for_call
from dreamsketch.tiny import tiny_scheduler


def one_request(prototype: Any, latents: torch.Tensor, steps: int, seed: int) -> tuple[float, float, int]:
    """Seconds in set_timesteps, seconds in the step calls, and how many step calls (two per step for Heun and
    DPM++ SDE)."""
    scheduler = copy.deepcopy(prototype)
    prepare_for_call(scheduler, [seed])
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in accepted else {}
    start = time.perf_counter()
    scheduler.set_timesteps(steps)
    set_up = time.perf_counter()
    sample = latents.clone()
    for timestep in scheduler.timesteps:
        model_output = 0.1 * scheduler.scale_model_input(sample, timestep)
        sample = scheduler.step(model_output, timestep, sample, **extra).prev_sample
    return set_up - start, time.perf_counter() - set_up, len(scheduler.timesteps)


def measure(name: str, steps: int, side: int, runs: int) -> dict[str, Any]:
    prototype = make_scheduler(name, tiny_scheduler().config)
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    timings = [one_request(prototype, latents, steps, seed) for seed in range(runs)]
    later = timings[1:] or timings
    steps_ms = statistics.median(t[1] for t in later) * 1000
    return {
        "first_request_ms": round((timings[0][0] + timings[0][1]) * 1000, 2),
        "set_timesteps_ms": round(statistics.median(t[0] for t in later) * 1000, 3),
        "steps_ms": round(steps_ms, 2),
        "step_calls": timings[0][2],
        "ms_per_step_call": round(steps_ms / timings[0][2], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", type=int, default=64, help="latent side (64: a 512x512 picture)")
    parser.add_argument("--runs", type=int, default=5, help="requests per scheduler; the first is reported apart")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "scheduler_steps",
        "steps": args.steps,
        "latents": [1, 4, args.side, args.side],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "schedulers": {name: measure(name, args.steps, args.side, args.runs) for name in SCHEDULERS},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
