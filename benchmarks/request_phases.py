"""Where one request's time goes in DreamSketch's engine: text encoding, UNet calls, scheduler steps, VAE decoding,
conversion to pictures, and the rest (`rest_ms`: the denoising loop's CFG arithmetic and step callbacks, scheduler
setup, initial noise, the engine's own work).

Each phase is timed with the device synchronised before and after it, so the phases add up to the synchronised
request time; the request time without those synchronisations is reported beside it. Full-size SD 1.5 at 512x512
(or SDXL at 1024x1024) with random weights, 30 steps, CFG 7.5, Euler a (`--scheduler` another), as in gpu_pipeline.
Prints one JSON document.

    python -m benchmarks.request_phases                   # on a CUDA GPU, the default engine (no torch.compile)
    python -m benchmarks.request_phases --variant compile # the whole fast path (compiles first: minutes)
    python -m benchmarks.request_phases --small           # tiny model on the CPU: checks the benchmark itself

Experiments (not in the app), each measured again after the ones before it: --cudnn-benchmark,
--cudnn-attention, --compile-vae.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch.nn.attention import SDPBackend

import dreamsketch.engine
from benchmarks.gpu_pipeline import (
    build_pipeline,
    cases,
    engine_caller,
    engine_for,
    first_figures,
    log_partial,
    pixels,
    prepare,
    timed,
)
from dreamsketch.fastpath import compile_regions, drop_graphs
from dreamsketch.schedulers import SCHEDULERS

PHASES = ("encode_prompt", "unet", "scheduler_step", "vae_decode", "to_pictures")


class PhaseClock:
    """Wraps callables so that each call's synchronised duration adds to its phase."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)  # diffusers reads the scheduler's signature to decide what to pass
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.sync()
                self.ms[phase] += (time.perf_counter() - start) * 1000
                self.calls[phase] += 1

        return timed_call

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        ms, calls = dict(self.ms), dict(self.calls)
        self.ms.clear()
        self.calls.clear()
        return ms, calls


@contextlib.contextmanager
def instrumented(pipe: Any, clock: PhaseClock) -> Iterator[None]:
    """Time the phases of `pipe`'s requests while inside."""
    targets = [
        (type(pipe.scheduler), "step", "scheduler_step"),  # the engine makes a new scheduler of this class per request
        (pipe, "encode_prompt", "encode_prompt"),
        (pipe.unet, "forward", "unet"),
        (pipe.vae, "decode", "vae_decode"),
        (dreamsketch.engine, "to_pictures", "to_pictures"),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, phase in targets:
            stack.enter_context(mock.patch.object(owner, name, clock.wrap(phase, getattr(owner, name))))
        yield


def measure(pipe: Any, call: Callable[[], Any], runs: int, cuda: bool) -> dict[str, Any]:
    plain_ms = [timed(call, cuda) * 1000 for _ in range(runs)]
    clock = PhaseClock(cuda)
    totals, phases, calls = [], defaultdict(list), {}
    with instrumented(pipe, clock):
        for _ in range(runs):
            totals.append(timed(call, cuda) * 1000)
            ms, calls = clock.take()
            for phase in PHASES:
                phases[phase].append(ms.get(phase, 0.0))
    median = {phase: round(statistics.median(values), 2) for phase, values in phases.items()}
    synced = statistics.median(totals)
    return {
        "request_ms": round(statistics.median(plain_ms), 2),
        "request_ms_synchronised": round(synced, 2),
        "phases_ms": median,
        "phase_calls": calls,
        "rest_ms": round(synced - sum(median.values()), 2),
    }


def experiment(pipe: Any, call: Callable[[], Any], runs: int, cuda: bool, change: Callable[[], None]) -> dict[str, Any]:
    """The same measurement after `change` (which stays made), its first call and how far its picture is from the
    picture before it (0..255)."""
    before = pixels(call()[0])
    change()
    first_s = timed(call, cuda)
    after = pixels(call()[0])
    return {
        "first_call_s": round(first_s, 3),
        "pixel_difference_max": int(np.abs(after - before).max()),
        **measure(pipe, call, runs, cuda),
    }


def use_cudnn_benchmark(pipe: Any) -> None:
    """cuDNN picks each convolution's algorithm by timing the candidates at the first call of a shape."""
    torch.backends.cudnn.benchmark = True
    drop_graphs(pipe)


def prefer_cudnn_attention(pipe: Any) -> None:
    """Scaled dot-product attention tries cuDNN's kernels first (torch prefers flash attention); compiled blocks
    are traced again, since the choice is made when tracing."""
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    torch._C._set_sdp_priority_order([int(backend) for backend in order])
    torch._dynamo.reset()
    drop_graphs(pipe)


def profile(call: Callable[[], Any], rows: int) -> tuple[str, float]:
    """torch.profiler's table of one request's operators, by time on the device (CPU time without a GPU), and the
    milliseconds the device was busy with kernels and copies (0 without a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        call()
    averages = profiler.key_averages()
    key = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    busy_ms = sum(event.self_device_time_total for event in averages) / 1000
    return averages.table(sort_by=key, row_limit=rows), busy_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, to check the benchmark")
    parser.add_argument("--only", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--variant", choices=["default", "compile"], default="default")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default="Euler a")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the fast path")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="also print torch.profiler's table")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="then let cuDNN time its convolution algorithms and measure again (an experiment: not in the app)",
    )
    parser.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="then let attention try cuDNN's kernels first and measure again (an experiment: not in the app)",
    )
    parser.add_argument(
        "--compile-vae",
        action="store_true",
        help="then compile the VAE decoder's blocks like the UNet's and measure again (an experiment: not in the app)",
    )
    args = parser.parse_args(argv)
    device, dtype = prepare(args.small)
    cuda = device.type == "cuda"
    case = next(case for case in cases(args.small) if case.family == args.only)
    pipe = build_pipeline(case, device, dtype)
    call = engine_caller(engine_for(case, pipe, args.variant, device, args.compile_backend), case, args.scheduler)
    report = {
        "benchmark": "request_phases",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__},
        "model": case.name,
        "variant": args.variant,
        "scheduler": args.scheduler,
        # compiles and captures (on CUDA compiles in the background, and the figures below wait for it)
        **first_figures(call, cuda, pipe if cuda and args.variant == "compile" else None),
    }
    busy_ms = None
    if args.profile:
        table, busy_ms = profile(call, args.profile)
        print(table, file=sys.stderr)
    report.update(measure(pipe, call, args.runs, cuda))
    if busy_ms is not None:  # the rest of request_ms is the device waiting for the host
        report["device_busy_ms"] = round(busy_ms, 2)
    log_partial(case, args.variant, report)  # each part also on stderr as it finishes: a run cut short keeps them
    experiments = {
        "cudnn_benchmark": (args.cudnn_benchmark, lambda: use_cudnn_benchmark(pipe)),
        "cudnn_attention": (args.cudnn_attention, lambda: prefer_cudnn_attention(pipe)),
        "vae_compiled": (args.compile_vae, lambda: compile_regions(pipe.vae.decoder, args.compile_backend)),
    }
    for name, (wanted, change) in experiments.items():
        if wanted:
            report[name] = experiment(pipe, call, args.runs, cuda, change)
            log_partial(case, f"{args.variant} + {name}", report[name])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
