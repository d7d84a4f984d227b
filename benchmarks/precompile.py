"""An experiment for the fast path's cold first call: the UNet's blocks compiled ahead, by worker processes at once.

One eager step at the model's size records the inputs of every block the fast path compiles; each distinct block
configuration is saved, and WORKERS processes compile them at once, as the fast path compiles them, into one empty
inductor cache. Then the fast path's first call compiles the UNet as the app does, on a fresh pipeline, and should
find every graph in the cache. Prints one JSON document: the blocks, the workers' seconds, the first call's
seconds, their sum, and the first call's FX graph cache hits and misses. Compare the sum with gpu_pipeline's cold
`first_call_s` (99 s for SD 1.5 on an H100, 2026-11-26; target under 60 s).

    python -m benchmarks.precompile --workers 4              # full-size SD 1.5 on a CUDA GPU
    python -m benchmarks.precompile --small --workers 2      # tiny SD 1.5 on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from benchmarks.gpu_pipeline import build_pipeline, cases, engine_caller, engine_for, prepare, timed
from dreamsketch import fastpath


class Holder(torch.nn.Module):
    """A saved block as the one child of a model, so that compile_regions compiles it as it does the UNet's."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)


def distinct_blocks(pipe: Any, size: int) -> list[dict[str, Any]]:
    """Each block configuration the fast path compiles, with its inputs in one eager step at `size`: blocks of the
    same class, parameter shapes and input layouts make the same graph."""
    found: dict[tuple, dict[str, Any]] = {}

    def record(block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        key = (
            type(block).__name__,
            tuple(tuple(parameter.shape) for parameter in block.parameters()),
            tuple((tuple(x.shape), x.stride(), x.dtype) for x in tensors),
            tuple(sorted(kwargs)),
        )
        found.setdefault(key, {"block": block, "args": args, "kwargs": kwargs})

    blocks = [module for module in pipe.unet.modules() if type(module).__name__ in fastpath.REGIONS]
    hooks = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad():
            pipe(prompt="", num_inference_steps=1, width=size, height=size, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    return list(found.values())


def compile_saved(files: list[str], backend: str) -> None:
    """A worker: compile each saved block as the fast path would, by calling it on its recorded inputs."""
    for file in files:
        saved = torch.load(file, weights_only=False)
        holder = Holder(saved["block"])
        fastpath.compile_regions(holder, backend)
        with torch.no_grad():
            holder(*saved["args"], **saved["kwargs"])


def precompile(pipe: Any, size: int, workers: int, backend: str) -> dict[str, Any]:
    start = time.perf_counter()
    blocks = distinct_blocks(pipe, size)
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for index, saved in enumerate(blocks):
            files.append(str(Path(folder) / f"block{index}.pt"))
            torch.save(saved, files[-1])
        threads = max(1, (os.cpu_count() or 1) // workers)  # inductor's compile threads, shared out
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
        command = [sys.executable, "-m", "benchmarks.precompile", "--backend", backend, "--worker"]
        processes = [subprocess.Popen([*command, *files[w::workers]], env=env) for w in range(workers)]
        failed = [process.args for process in processes if process.wait() != 0]
    if failed:
        raise RuntimeError(f"precompile workers failed: {failed}")
    return {"blocks": len(blocks), "workers": workers, "precompile_s": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny SD 1.5 on the CPU, to check the script")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (the FX graph cache: inductor)")
    parser.add_argument("--worker", nargs="+", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        compile_saved(args.worker, args.backend)
        return 0
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # not chosen: an empty one
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dreamsketch-precompile-")
    device, dtype = prepare(args.small)
    case = next(case for case in cases(args.small) if case.family == "sd15")
    recorder = build_pipeline(case, device, dtype)
    fastpath.convert_layout(recorder)
    figures = precompile(recorder, case.size, args.workers, args.backend)
    del recorder
    call = engine_caller(engine_for(case, build_pipeline(case, device, dtype), "compile", device, args.backend), case)
    counters.clear()
    figures["first_call_s"] = round(timed(call, device.type == "cuda"), 3)
    figures["total_s"] = round(figures["precompile_s"] + figures["first_call_s"], 3)
    figures["fxgraph_cache_hit"] = counters["inductor"]["fxgraph_cache_hit"]
    figures["fxgraph_cache_miss"] = counters["inductor"]["fxgraph_cache_miss"]
    report = {
        "benchmark": "precompile",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__},
        "model": case.name,
        "compile_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"],
        **figures,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
