"""Load: N concurrent clients (every other one gradio_client, the rest plain HTTP) against one real server with
tiny-demo, each making a few txt2img requests at once. Prints JSON: throughput, p50/p95 latency, outcomes, gallery
checks and the server's memory before and after.

Every request must end with its images or a clear "busy" refusal; the gallery must gain exactly one row (with its
file) per image returned, none lost or duplicated; the process's memory after the run must be within 10% of before.

    python benchmarks/load.py                 # 64 clients x 2 requests (the benchmark)
    python benchmarks/load.py --clients 16    # what `make test` runs (tests/test_load.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from dreamsketch.config import Settings
from dreamsketch.gallery import Gallery

REQUEST: dict[str, Any] = {"model_id": "tiny-demo", "width": 64, "height": 64, "steps": 2}
BUSY_WORDS = ("busy", "queue is full")
MEMORY_TOLERANCE = 0.10


@dataclass
class Outcome:
    kind: str  # "http" or "gradio_client"
    result: str  # "images", "busy" or "error"
    latency_s: float
    ids: list[int] = field(default_factory=list)
    message: str = ""


def write_registry(folder: Path) -> Path:
    model: dict[str, Any] = {"id": "tiny-demo", "name": "Tiny demo (noise)", "source": "builtin:tiny", "family": "sd15"}
    model |= {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}
    registry = folder / "models.yaml"
    registry.write_text(yaml.safe_dump([model]), encoding="utf-8")
    return registry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(
    folder: Path, queue_size: int, timeout: float = 120.0, command: tuple[str, ...] = ("-m", "dreamsketch", "serve")
) -> Iterator[tuple[str, psutil.Process]]:
    """`python -m dreamsketch serve` (or `command` after `python`) with tiny-demo on a free port, in its own process
    (so its memory is its own), with Ctrl-C's default handling (a background job ignores SIGINT)."""
    port = free_port()
    env = {
        **os.environ,
        "DREAMSKETCH_MODELS_FILE": str(write_registry(folder)),
        "DREAMSKETCH_OUTPUT_DIR": str(folder / "outputs"),
        "DREAMSKETCH_DEFAULT_MODEL": "tiny-demo",
        "DREAMSKETCH_QUEUE_SIZE": str(queue_size),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdout=log,
        stderr=log,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def classify(kind: str, started: float, ids: list[int] | None, message: str = "") -> Outcome:
    latency = time.perf_counter() - started
    if ids:
        return Outcome(kind, "images", latency, ids)
    busy = any(word in message.lower() for word in BUSY_WORDS)
    return Outcome(kind, "busy" if busy else "error", latency, message=message[:300])


def http_client(url: str, index: int, requests: int, start: threading.Barrier) -> list[Outcome]:
    outcomes = []
    with httpx.Client(base_url=url, timeout=600) as client:
        start.wait()
        for n in range(requests):
            began = time.perf_counter()
            try:
                reply = client.post("/api/txt2img", json={**REQUEST, "prompt": f"http {index}.{n}", "seed": index})
                body = reply.json()
                ids = [r["id"] for r in body.get("results", [body["result"]])] if reply.status_code == 200 else None
                outcomes.append(classify("http", began, ids, str(body.get("error", ""))))
            except (httpx.HTTPError, ValueError, KeyError) as error:
                outcomes.append(classify("http", began, None, repr(error)))
    return outcomes


def gradio_client(url: str, index: int, requests: int, start: threading.Barrier, downloads: Path) -> list[Outcome]:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(downloads))
    outcomes = []
    try:
        start.wait()
        for n in range(requests):
            began = time.perf_counter()
            try:
                _images, info = client.predict(prompt=f"gradio {index}.{n}", seed=index, **REQUEST, api_name="/txt2img")
                outcomes.append(classify("gradio_client", began, list(info["ids"])))
            except Exception as error:  # noqa: BLE001 (AppError, QueueError, ...: classified by message)
                outcomes.append(classify("gradio_client", began, None, str(error)))
    finally:
        client.close()
    return outcomes


def run_clients(url: str, clients: int, requests: int, downloads: Path) -> tuple[list[Outcome], float]:
    start = threading.Barrier(clients + 1)
    results: list[list[Outcome]] = [[] for _ in range(clients)]

    def work(i: int) -> None:
        if i % 2:
            results[i] = gradio_client(url, i, requests, start, downloads)
        else:
            results[i] = http_client(url, i, requests, start)

    threads = [threading.Thread(target=work, args=(i,), name=f"load-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait(timeout=300)
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return [outcome for per_client in results for outcome in per_client], time.perf_counter() - began


def queue_length(url: str) -> int:
    return int(httpx.get(f"{url}/api/status", timeout=30).json()["queue_length"])


def gallery_checks(gallery: Gallery, before: set[int], outcomes: list[Outcome]) -> dict[str, Any]:
    returned = [i for outcome in outcomes for i in outcome.ids]
    new = {entry.id: entry for entry in gallery.list(limit=1_000_000) if entry.id not in before}
    missing_files = [e.file_name for e in new.values() if gallery.file_path(e.file_name) is None]
    return {
        "rows_added": len(new),
        "images_returned": len(returned),
        "duplicated_ids": len(returned) - len(set(returned)),
        "lost_rows": len(set(returned) - set(new)),
        "rows_not_returned": len(set(new) - set(returned)),
        "rows_without_file": len(missing_files),
    }


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 4)


WARM_UP_ROUNDS = 2


def run(folder: Path, clients: int, requests: int, queue_size: int = Settings.queue_size) -> dict[str, Any]:
    """Start the server in `folder`, warm it up with WARM_UP_ROUNDS rounds the same as the measured one (the
    allocator's arenas settle: after one, the measured round still grew the server by 4-12 % at 16 clients, after
    two by 3-7 %), run the clients and report (module docstring)."""
    downloads = folder / "downloads"
    with server_process(folder, queue_size) as (url, server):
        for _ in range(WARM_UP_ROUNDS):
            run_clients(url, clients, requests, downloads)
        gallery = Gallery(folder / "outputs")
        before_ids = {entry.id for entry in gallery.list(limit=1_000_000)}
        memory_before = server.memory_info().rss
        outcomes, wall = run_clients(url, clients, requests, downloads)
        pending_after = queue_length(url)
        memory_after = server.memory_info().rss
    latencies = [o.latency_s for o in outcomes if o.result == "images"]
    counts = {kind: sum(o.result == kind for o in outcomes) for kind in ("images", "busy", "error")}
    checks = gallery_checks(gallery, before_ids, outcomes)
    growth = (memory_after - memory_before) / memory_before
    ok = (
        counts["error"] == 0
        and len(outcomes) == clients * requests
        and checks["rows_added"] == checks["images_returned"]
        and not any(checks[key] for key in ("duplicated_ids", "lost_rows", "rows_not_returned", "rows_without_file"))
        and abs(growth) <= MEMORY_TOLERANCE
        and pending_after == 0
    )
    return {
        "benchmark": "load",
        "ok": ok,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {name: version(name) for name in ("torch", "diffusers", "gradio", "gradio_client")},
        "clients": clients,
        "requests_per_client": requests,
        "request": REQUEST,
        "wall_s": round(wall, 3),
        "throughput_images_per_s": round(len(latencies) / wall, 3) if wall else None,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "outcomes": counts,
        "outcomes_by_kind": {
            kind: {r: sum(o.kind == kind and o.result == r for o in outcomes) for r in ("images", "busy", "error")}
            for kind in ("http", "gradio_client")
        },
        "errors": sorted({o.message for o in outcomes if o.result == "error"})[:10],
        "gallery": checks,
        "memory": {"rss_before": memory_before, "rss_after": memory_after, "growth_pct": round(100 * growth, 2)},
        "pending_after": pending_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--queue-size", type=int, default=Settings.queue_size)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dreamsketch-load-") as folder:
        report = run(Path(folder), args.clients, args.requests, args.queue_size)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
