"""The fast path's regional compilation of the full-size SD 1.5 and SDXL UNets (random weights, fp32, on the CPU):
per call, the graphs torch.compile makes (blocks configured like an earlier model's reuse its graphs), whether a
block breaks its graph, whether a new batch size or picture size compiles again (it must not: dynamic shapes),
how far the output is from eager, and the time. Prints one JSON document.

    python -m benchmarks.compile_regions                       # aot_eager: tracing only, about 2 minutes on a CPU
    python -m benchmarks.compile_regions --backend inductor    # inductor's code generation too
    python -m benchmarks.compile_regions --small               # tiny UNets: checks the script itself
    python -m benchmarks.compile_regions --regions BasicTransformerBlock   # an experiment: other blocks compiled
    python -m benchmarks.compile_regions --top-levels 2        # an experiment: the two top levels' blocks only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor import metrics

from benchmarks.gpu_pipeline import add_regions_argument, build_pipeline, cases, compiled_regions, unet_inputs
from dreamsketch.fastpath import apply_fast_path

# (UNet batch, latent height, latent width): the first call compiles, the others must not (the last: a 64-pixel
# side, which leaves SD 1.5's deepest level a side of 1, runs eagerly)
SHAPES = ((2, 16, 16), (6, 24, 24), (2, 32, 24), (2, 8, 24))


def check(pipe: Any, backend: str) -> dict[str, Any]:
    unet = pipe.unet.eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        inputs = [
            unet_inputs(unet, batch, height, cpu, torch.float32, torch.Generator().manual_seed(batch + height), width)
            for batch, height, width in SHAPES
        ]
        eager = [unet(*args, **kwargs, return_dict=False)[0] for args, kwargs in inputs]
        apply_fast_path(pipe, backend)
        counters.clear()
        calls = []
        for (batch, height, width), (args, kwargs), expected in zip(SHAPES, inputs, eager, strict=True):
            graphs, kernels = counters["stats"]["unique_graphs"], metrics.generated_kernel_count
            start = time.perf_counter()
            output = unet(*args, **kwargs, return_dict=False)[0]
            seconds = time.perf_counter() - start
            calls.append(
                {
                    "batch": batch,
                    "latent": [height, width],
                    "seconds": round(seconds, 2),
                    "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
                    "kernels_generated": metrics.generated_kernel_count - kernels,  # by inductor; 0 with aot_eager
                    "max_difference_vs_eager": (output - expected).abs().max().item(),
                }
            )
    return {
        "graphs_compiled_by_later_calls": sum(call["graphs_compiled"] for call in calls[1:]),
        "graph_breaks": sum(counters["graph_break"].values()),
        "calls": calls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor: code generation)")
    parser.add_argument("--only", choices=["sd15", "sdxl"], help="one model family instead of both")
    parser.add_argument("--small", action="store_true", help="tiny UNets, to check the script")
    add_regions_argument(parser)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "compile_regions",
        "backend": args.backend,
        "regions": args.regions,
        "top_levels": args.top_levels,
        "torch": torch.__version__,
    }
    torch._dynamo.reset()  # count from nothing compiled, whatever ran before in this process
    for case in cases(args.small):
        if args.only and case.family != args.only:
            continue
        pipe = build_pipeline(case, torch.device("cpu"), torch.float32)
        with compiled_regions(args.regions, args.top_levels):
            report[case.name] = check(pipe, args.backend)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
