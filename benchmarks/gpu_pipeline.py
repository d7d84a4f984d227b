"""Plain diffusers against DreamSketch's engine (default: on CUDA the fast path without compilation; and the whole
fast path of DREAMSKETCH_COMPILE=1), in one process run.

Full-size SD 1.5 (512x512) and SDXL (1024x1024) architectures with random weights (the compute is that of
real weights), fp16, 30 steps, CFG 7.5, batch 1. Prints one JSON document.

    python benchmarks/gpu_pipeline.py                 # on a CUDA GPU; under 8 minutes on an H100/H200
    python benchmarks/gpu_pipeline.py --small         # tiny models on the CPU: checks the benchmark itself
    python benchmarks/gpu_pipeline.py --first-call    # the fast path's first call alone, in a fresh process
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreamsketch import fastpath
from dreamsketch.config import Settings
from dreamsketch.engine import LocalEngine
from dreamsketch.fastpath import apply_fast_path, configure_compile_cache, graphed_models, wait_for_compilation
from dreamsketch.pipelines import PIPELINE_CLASSES, LoadedModel
from dreamsketch.registry import ModelSpec, Registry
from dreamsketch.request import parse_request
from dreamsketch.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline, tiny_tokenizer

PEAK_TFLOPS = 790.0  # dense fp16 tensor-core peak of an H100/H200 SXM
CONCURRENCY = (4, 8)
# The engine's variants, measured after plain diffusers on the same pipeline object, in this order: what a user
# runs with DREAMSKETCH_COMPILE=0 and 1. (Until 2026-11-27 the default engine ran without the fast path, and what
# it runs now on CUDA was measured as "dreamsketch_graphs": see RESULTS.md.)
VARIANTS = {"dreamsketch": "default", "dreamsketch_compile": "compile"}


def sd15_pipeline() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=sd_vae(0.18215),
        text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072, "quick_gelu")),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = sd_vae(0.13025)
    vae.register_to_config(force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, 5120, "gelu", projection=1280)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
    )


def clip_text_config(hidden: int, layers: int, heads: int, mlp: int, act: str, projection: int = 768) -> Any:
    tokenizer = tiny_tokenizer()
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act=act,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=scaling_factor,
    )


def scheduler() -> EulerAncestralDiscreteScheduler:
    with torch.device("cpu"):  # its tables go through numpy; the models are built under a CUDA device context
        return EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )


@dataclasses.dataclass
class Case:
    model_id: str
    family: str
    size: int
    steps: int
    build: Callable[[], Any]

    @property
    def name(self) -> str:
        """The model's key in the reports, e.g. sd15_512."""
        return f"{self.model_id}_{self.size}"


def cases(small: bool) -> list[Case]:
    if small:
        return [
            Case("tiny-sd15", "sd15", 128, 4, build_tiny_pipeline),
            Case("tiny-sdxl", "sdxl", 128, 4, build_tiny_sdxl_pipeline),
        ]
    return [Case("sd15", "sd15", 512, 30, sd15_pipeline), Case("sdxl", "sdxl", 1024, 30, sdxl_pipeline)]


class UnetTimer:
    """Time every UNet call with CUDA events (wall clock on the CPU) and note its batch size."""

    def __init__(self, unet: torch.nn.Module, cuda: bool) -> None:
        self.cuda, self.times_ms, self._start = cuda, [], None
        self._pending: list[tuple[Any, Any]] = []
        self.batch_sizes: list[int] = []
        self._hooks = [
            unet.register_forward_pre_hook(lambda _, args: self._begin(args[0].shape[0])),
            unet.register_forward_hook(lambda *_: self._end()),
        ]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _begin(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _end(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self.times_ms.append((time.perf_counter() - self._start) * 1000)

    def take(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.times_ms += [start.elapsed_time(end) for start, end in self._pending]
            self._pending = []
        times, self.times_ms = self.times_ms, []
        return times


def unet_inputs(
    unet: Any,
    batch: int,
    latent: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: Any = None,
    latent_width: int | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments of one UNet call: noisy latents, a timestep, text embeddings (SDXL: also pooled embeddings and
    size ids), random, at UNet batch `batch` and latent height `latent` (width `latent_width`, default the same)."""
    config = unet.config

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    args = (
        noise(batch, 4, latent, latent_width or latent),
        torch.tensor(500, device=device),
        noise(batch, 77, config.cross_attention_dim),
    )
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": noise(batch, pooled), "time_ids": noise(batch, 6)}
    return args, kwargs


def unet_flops(pipe: Any, case: Case, device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one UNet call with CFG (batch 2), counted by torch's flop counter."""
    args, kwargs = unet_inputs(pipe.unet, 2, case.size // 8, device, dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe.unet(*args, **kwargs)
    return counter.get_total_flops()


def measure(run: Callable[[], Any], timer: UnetTimer, runs: int, cuda: bool, pipe: Any = None) -> dict[str, Any]:
    """The first call, then `runs` calls. With `pipe`, whose UNet compiles in the background, the first call's
    figures are the first picture's, and the calls are timed once the compiled UNet serves."""
    figures = first_figures(run, cuda, pipe)
    timer.take()
    reset_memory_peaks(cuda)
    latencies, unet_ms = [], []
    for _ in range(runs):
        latencies.append(timed(run, cuda))
        unet_ms += timer.take()
    return {
        **figures,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_all_s": [round(x, 4) for x in latencies],
        "unet_ms_per_step": round(statistics.median(unet_ms), 3),
        **memory_peaks(cuda),
    }


def first_figures(run: Callable[[], Any], cuda: bool, pipe: Any = None) -> dict[str, Any]:
    """The first call's time; with `pipe`, whose UNet compiles in the background (the fast path on CUDA), also
    the time from the first call's start until the compiled UNet serves (`compiled_after_s`: compilation ended
    and one more call, which captures its CUDA graph, `first_compiled_call_s`, done)."""
    start = time.perf_counter()
    figures = {"first_call_s": round(timed(run, cuda), 3)}
    if pipe is None:
        return figures
    if not wait_for_compilation(pipe):
        raise RuntimeError("the fast path's compilation failed (see the log): no compiled figures")
    figures["first_compiled_call_s"] = round(timed(run, cuda), 3)
    figures["compiled_after_s"] = round(time.perf_counter() - start, 3)
    return figures


def reset_memory_peaks(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()  # what is reserved from now on, the CUDA graphs' pools included
        torch.cuda.reset_peak_memory_stats()


def memory_peaks(cuda: bool) -> dict[str, float | None]:
    """GPU memory in tensors at most, and held by torch at most (CUDA graphs keep their pools reserved)."""
    gb = 1e9
    return {
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / gb, 2) if cuda else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / gb, 2) if cuda else None,
    }


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def timed(run: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def concurrent_throughput(
    call: Callable[[int], Any], clients: int, cuda: bool, timer: UnetTimer, steps: int
) -> dict[str, Any]:
    """Images per second when `clients` requests arrive at once (after one untimed round: compiles, warm-up), how
    the engine split the timed round into pipeline calls (requests per call: a UNet call with CFG holds two rows per
    request, and a pipeline call makes `steps` UNet calls), and the peak GPU memory of both rounds (CUDA graphs
    keep the memory of the largest batch they captured reserved)."""

    def round_of_requests() -> None:
        arrival = threading.Barrier(clients)  # all requests arrive together, not as their threads happen to start

        def arrive(seed: int) -> Any:
            arrival.wait()
            return call(seed)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(arrive, range(clients)))  # a failed request fails the benchmark

    reset_memory_peaks(cuda)
    round_of_requests()
    timer.take()
    timer.batch_sizes = []
    seconds = timed(round_of_requests, cuda)
    return {
        "images_per_s": round(clients / seconds, 3),
        "batches": [rows // 2 for rows in timer.batch_sizes[::steps]],
        **memory_peaks(cuda),
    }


def engine_for(case: Case, pipe: Any, variant: str, device: torch.device, backend: str) -> LocalEngine:
    """A DreamSketch engine holding an already built pipeline (same weights as the plain run), made fast as loading
    makes it, without its warm-up (the first call is timed). variant: "default" or "compile"."""
    spec = ModelSpec(case.model_id, case.model_id, "builtin:tiny", case.family, case.size, case.size, case.steps, 7.5)
    engine = LocalEngine(Settings(device=device.type, compile=variant == "compile"), Registry([spec]))
    cache = engine.cache
    if cache.compile or cache.graphs:
        for model in graphed_models(pipe):  # graphs captured by an earlier variant hold other kernels
            vars(model).pop("forward", None)
        apply_fast_path(pipe, backend if cache.compile else None, cache.graphs)
    img2img = PIPELINE_CLASSES[case.family][1].from_pipe(pipe, dtype=pipe.dtype)
    engine.cache.loaded[case.model_id] = LoadedModel(spec, pipe, img2img, pipe.scheduler)
    return engine


def engine_caller(engine: LocalEngine, case: Case, scheduler: str = "Euler a") -> Callable[[int], Any]:
    fields = {"prompt": "a photo of a fox", "steps": case.steps, "guidance_scale": 7.5, "scheduler": scheduler}

    def engine_call(seed: int = 0) -> Any:
        request = parse_request({**fields, "seed": seed}, engine.cache.registry, "txt2img", case.model_id)
        return engine.generate(request).images

    return engine_call


def log_partial(case: Case, variant: str, stats: dict[str, Any]) -> None:
    """One JSON line on stderr as each part of a variant finishes, so that a run cut short still leaves its
    figures."""
    print(json.dumps({"model": case.name, "variant": variant, **stats}), file=sys.stderr, flush=True)


def build_pipeline(case: Case, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights made on the device itself (SDXL's take most of a minute on a CPU); no progress bars."""
    torch.manual_seed(0)
    with torch.device(device):
        pipe = case.build()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def bench_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    runs: int,
    backend: str,
    variants: list[str],
    concurrency: list[int],
) -> dict[str, Any]:
    cuda = device.type == "cuda"
    pipe = build_pipeline(case, device, dtype)
    flops = unet_flops(pipe, case, device, dtype)
    kwargs = dict(prompt="a photo of a fox", num_inference_steps=case.steps, guidance_scale=7.5)
    kwargs.update(width=case.size, height=case.size)
    results: dict[str, Any] = {"unet_tflop_per_step": round(flops / 1e12, 3)}

    def plain_call(seed: int = 0) -> Any:
        return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images

    reference = pixels(plain_call(0)[0])
    timer = UnetTimer(pipe.unet, cuda)
    plain = measure(plain_call, timer, runs, cuda)
    timer.close()
    if concurrency:  # the baseline of the requests-at-once figures: as many requests, one after another
        n = max(concurrency)
        plain["sequential_images_per_s"] = round(n / timed(lambda: [plain_call(seed) for seed in range(n)], cuda), 3)
    results["plain_diffusers"] = plain
    log_partial(case, "plain_diffusers", plain)

    for name in variants:
        engine = engine_for(case, pipe, VARIANTS[name], device, backend)
        timer = UnetTimer(pipe.unet, cuda)
        engine_call = engine_caller(engine, case)
        stats = measure(engine_call, timer, runs, cuda, pipe if cuda and name == "dreamsketch_compile" else None)
        difference = np.abs(pixels(engine_call(0)[0]) - reference)
        stats["pixel_difference_vs_plain"] = {"max": int(difference.max()), "mean": round(float(difference.mean()), 3)}
        log_partial(case, name, stats)
        stats["at_once"] = {n: concurrent_throughput(engine_call, n, cuda, timer, case.steps) for n in concurrency}
        timer.close()
        results[name] = stats
        log_partial(case, name, stats)

    for name in ("plain_diffusers", *variants):
        stats = results[name]
        step_s = stats["unet_ms_per_step"] / 1000
        stats["it_per_s"] = round(case.steps / stats["latency_p50_s"], 2)
        stats["achieved_tflops"] = round(flops / 1e12 / step_s, 1)
        stats["share_of_peak_pct"] = round(100 * flops / 1e12 / step_s / PEAK_TFLOPS, 1)
        stats["speedup_vs_plain"] = round(results["plain_diffusers"]["latency_p50_s"] / stats["latency_p50_s"], 2)
    plain_sequential = results["plain_diffusers"].get("sequential_images_per_s")
    for name in variants:  # issue 5's two targets for requests at once, read off directly
        stats = results[name]
        for figures in stats.get("at_once", {}).values():
            figures["vs_plain_one_after_another"] = round(figures["images_per_s"] / plain_sequential, 2)
            figures["vs_itself_one_after_another"] = round(figures["images_per_s"] * stats["latency_p50_s"], 2)
    return results


def first_call(case: Case, device: torch.device, dtype: torch.dtype, backend: str) -> dict[str, Any]:
    """The fast path's first request in this process and, on CUDA, how long until the compiled UNet serves:
    compilation (from inductor's cache where it is warm, as after a restart) and CUDA graph capture."""
    configure_compile_cache()
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    files_before = sum(1 for path in cache.rglob("*") if path.is_file()) if cache.is_dir() else 0
    pipe = build_pipeline(case, device, dtype)
    engine = engine_for(case, pipe, "compile", device, backend)
    cuda = device.type == "cuda"
    figures = first_figures(engine_caller(engine, case), cuda, pipe if cuda else None)
    return {**figures, "compile_cache": str(cache), "cache_files_before": files_before}


def prepare(small: bool) -> tuple[torch.device, torch.dtype]:
    """Log the fast path's compilations and graph captures, and choose what to measure on: CUDA in fp16, or with
    --small the CPU in fp32. Exits (status 2) without a GPU unless --small."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dreamsketch").setLevel(logging.INFO)
    if small:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        print("no CUDA GPU: run with --small to check the benchmark on the CPU", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda"), torch.float16


def add_regions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--regions",
        nargs="+",
        default=list(fastpath.REGIONS),
        help="block classes the fast path compiles (an experiment: the app compiles fastpath.REGIONS)",
    )
    parser.add_argument(
        "--top-levels",
        type=int,
        metavar="N",
        help="compile only the blocks of the UNet's N top levels, the largest latents (an experiment: the app "
        "compiles every level; SD 1.5 has 4)",
    )


def compiled_regions(regions: list[str], top_levels: int | None) -> contextlib.ExitStack:
    """The fast path compiles `regions`, in the UNet's `top_levels` top levels only (None: every level)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(fastpath, "REGIONS", tuple(regions)))
    if top_levels is not None:
        compile_regions = fastpath.compile_regions

        def top_levels_only(model: torch.nn.Module, backend: str) -> None:
            compile_regions(model, backend)
            if hasattr(model, "up_blocks"):  # the UNet: its deeper levels and middle block run eagerly
                deeper = [*model.down_blocks[top_levels:], model.mid_block, *model.up_blocks[: -top_levels or None]]
                for module in (module for block in deeper for module in block.modules()):
                    module._compiled_call_impl = None  # what nn.Module.compile sets

        stack.enter_context(mock.patch.object(fastpath, "compile_regions", top_levels_only))
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, to check the benchmark")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=["sd15", "sdxl"], help="one model family instead of both")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--concurrency", nargs="*", type=int, default=list(CONCURRENCY), help="requests at once (none: skip)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the fast path")
    add_regions_argument(parser)
    parser.add_argument(
        "--first-call", action="store_true", help="only the fast path's first call (run again: a warm compile cache)"
    )
    args = parser.parse_args(argv)
    device, dtype = prepare(args.small)
    cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "benchmark": "gpu_pipeline",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda},
        "settings": {
            "dtype": str(dtype),
            "guidance_scale": 7.5,
            "batch": 1,
            "runs": args.runs,
            "compile_backend": args.compile_backend,
            "compiled_regions": args.regions,
            "compiled_top_levels": args.top_levels,
        },
        "models": {},
    }
    for case in cases(args.small):
        if args.only and case.family != args.only:
            continue
        with compiled_regions(args.regions, args.top_levels):
            if args.first_call:
                figures = {"dreamsketch_compile": first_call(case, device, dtype, args.compile_backend)}
            else:
                figures = bench_case(
                    case, device, dtype, args.runs, args.compile_backend, args.variants, args.concurrency
                )
        report["models"][case.name] = figures
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
