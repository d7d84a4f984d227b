"""The fast path's regional compilation of the full-size SD 1.5 and SDXL UNets (random weights, fp32, on the CPU):
per call, the graphs torch.compile makes (blocks configured like an earlier model's reuse its graphs), whether a
block breaks its graph, whether a new batch size or picture size compiles again (it must not: dynamic shapes),
how far the output is from eager, and the time. Prints one JSON document.

    python -m benchmarks.compile_regions                       # aot_eager: tracing only, about 2 minutes on a CPU
    python -m benchmarks.compile_regions --backend inductor    # inductor's code generation too
    python -m benchmarks.compile_regions --small               # tiny UNets: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from torch._dynamo.utils import counters

from benchmarks.gpu_pipeline import build_pipeline, cases
from dreamsketch.fastpath import compile_regions

SHAPES = ((2, 16), (6, 24), (2, 32))  # (UNet batch, latent side): the first call compiles, the others must not


def unet_inputs(unet: torch.nn.Module, batch: int, side: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    generator = torch.Generator().manual_seed(batch * 100 + side)
    config = unet.config
    args = (
        torch.randn(batch, 4, side, side, generator=generator),
        torch.tensor(500.0),
        torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
    )
    kwargs: dict[str, Any] = {"return_dict": False}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        }
    return args, kwargs


def check(unet: torch.nn.Module, backend: str) -> dict[str, Any]:
    with torch.no_grad():
        inputs = [unet_inputs(unet, batch, side) for batch, side in SHAPES]
        eager = [unet(*args, **kwargs)[0] for args, kwargs in inputs]
        unet.to(memory_format=torch.channels_last)
        unet.fuse_qkv_projections()
        compile_regions(unet, backend)
        counters.clear()
        calls = []
        for (batch, side), (args, kwargs), expected in zip(SHAPES, inputs, eager, strict=True):
            graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
            output = unet(*args, **kwargs)[0]
            seconds = time.perf_counter() - start
            calls.append(
                {
                    "batch": batch,
                    "latent": side,
                    "seconds": round(seconds, 2),
                    "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
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
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"benchmark": "compile_regions", "backend": args.backend, "torch": torch.__version__}
    for case in cases(args.small):
        if args.only and case.family != args.only:
            continue
        unet = build_pipeline(case, torch.device("cpu"), torch.float32).unet.eval()
        report[f"{case.model_id}_{case.size}"] = check(unet, args.backend)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
