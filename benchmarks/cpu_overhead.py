"""What DreamSketch adds around a generation, on the CPU with tiny-demo, in one process run.

Compares, for the same request: a direct engine call; the HTTP API (POST /api/txt2img); gradio_client on
/txt2img; and Gradio's own trivial endpoint that returns an image (what any Gradio app pays). Prints JSON
with p50/p95 latencies and the parts of the added time (queue, inference, PNG encoding, gallery write).

    python -m benchmarks.cpu_overhead [--runs 30]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import numpy as np
import torch
from fastapi import FastAPI
from gradio_client import Client
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreamsketch.config import Settings
from dreamsketch.gallery import Gallery
from dreamsketch.server import create_server, running_server
from dreamsketch.studio import Studio, image_meta

FIELDS = {"prompt": "a red fox", "model_id": "tiny-demo", "width": 64, "height": 64, "steps": 2, "seed": 1}
REGISTRY = """- {id: tiny-demo, name: Tiny demo (noise), source: "builtin:tiny", family: sd15,
   width: 128, height: 128, steps: 4, guidance_scale: 7.5}
"""


def timings_ms(call: Callable[[], Any], runs: int) -> list[float]:
    return interleaved_ms({"call": call}, runs)["call"]


def interleaved_ms(calls: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """Time each call `runs` times, round-robin, so that a busy machine slows every path alike."""
    for call in calls.values():
        call()  # warm-up: model load, connections
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(float(np.percentile(times, 95)), 2)}


def trivial_gradio_app() -> gr.Blocks:
    picture = Image.new("RGB", (64, 64), "orange")
    with gr.Blocks() as demo:
        button = gr.Button()
        output = gr.Image(type="pil")
        button.click(lambda: picture, None, output, api_name="picture")
    return demo


def parts_ms(studio: Studio, runs: int) -> dict[str, float]:
    """PNG encoding and gallery write of the request's picture, timed one by one."""
    generation = studio.engine.generate(studio.parse(FIELDS, "txt2img"))
    image = generation.images[0]
    meta = image_meta(generation.request, generation.seeds[0], generation.scheduler)
    info = PngInfo()
    info.add_text("parameters", "x" * 200)
    encode = timings_ms(lambda: image.save(io.BytesIO(), format="PNG", pnginfo=info), runs)
    with tempfile.TemporaryDirectory() as folder:
        gallery = Gallery(folder)
        save = timings_ms(lambda: gallery.save(image, meta), runs)
    return {
        "png_encoding_p50_ms": summary(encode)["p50_ms"],
        "gallery_write_p50_ms": round(summary(save)["p50_ms"] - summary(encode)["p50_ms"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "models.yaml").write_text(REGISTRY)
        settings = Settings(models_file=Path(root) / "models.yaml", output_dir=Path(root) / "outputs")
        studio = Studio(settings)
        report = measure(studio, args.runs)
    print(json.dumps(report, indent=2))
    return 0


def measure(studio: Studio, runs: int) -> dict[str, Any]:
    request = studio.parse(FIELDS, "txt2img")
    app, _demo = create_server(studio)
    trivial_app = gr.mount_gradio_app(FastAPI(), trivial_gradio_app(), path="/")
    with (
        running_server(app) as url,
        running_server(trivial_app) as trivial_url,
        httpx.Client(timeout=60) as http,  # one keep-alive connection, like a script
    ):
        client, trivial_client = Client(url, verbose=False), Client(trivial_url, verbose=False)
        paths = interleaved_ms(
            {
                "direct_engine": lambda: studio.engine.generate(request),
                "studio_generate": lambda: studio.generate(request),
                "http_api": lambda: http.post(f"{url}/api/txt2img", json=FIELDS).raise_for_status(),
                "gradio_client": lambda: client.predict(**FIELDS, api_name="/txt2img"),
                "gradio_trivial_endpoint": lambda: trivial_client.predict(api_name="/picture"),
            },
            runs,
        )
        client.close()
        trivial_client.close()
    stats = {name: summary(times) for name, times in paths.items()}
    direct, trivial = stats["direct_engine"]["p50_ms"], stats["gradio_trivial_endpoint"]["p50_ms"]
    return {
        "benchmark": "cpu_overhead",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"cpu, {os.cpu_count()} cores",
        "versions": {"torch": torch.__version__, "gradio": gr.__version__},
        "request": FIELDS,
        "runs": runs,
        "latency": stats,
        "added_p50_ms": {
            "http_api_over_direct_engine": round(stats["http_api"]["p50_ms"] - direct, 2),
            "gradio_client_over_trivial_endpoint_and_engine": round(
                stats["gradio_client"]["p50_ms"] - trivial - direct, 2
            ),
        },
        "parts": {
            "inference_p50_ms": direct,  # the direct engine call, timed in the same round-robin as the paths
            **parts_ms(studio, runs),
            "gradio_queue_and_transport_p50_ms": trivial,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
