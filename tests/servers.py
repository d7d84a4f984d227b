"""Launch the real server (HTTP API + Gradio UI + MCP) under uvicorn in a thread, on a free 127.0.0.1 port."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from dreamsketch.config import Settings
from dreamsketch.server import create_server
from dreamsketch.studio import Studio


@dataclass
class RunningServer:
    url: str
    studio: Studio
    server: uvicorn.Server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(studio: Studio, timeout: float = 30.0) -> Iterator[RunningServer]:
    app, _demo = create_server(studio)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {url} did not start")
        time.sleep(0.05)
    httpx.get(f"{url}/gradio_api/mcp/schema", timeout=10)  # the app answers (auth may refuse this one)
    try:
        yield RunningServer(url, studio, server)
    finally:
        quiet_shutdown(server, thread)


def quiet_shutdown(server: uvicorn.Server, thread: threading.Thread) -> None:
    """Stop the server; open streams (a client's heartbeat) are cut after a second without a log of tracebacks."""
    errors = logging.getLogger("uvicorn.error")
    level = errors.level
    errors.setLevel(logging.CRITICAL)
    try:
        server.should_exit = True
        thread.join(timeout=15)
    finally:
        errors.setLevel(level)


def tiny_settings(folder: Path, **overrides: Any) -> Settings:
    """Settings for a registry with the builtin tiny-demo model only, under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    registry = folder / "models.yaml"
    if not registry.exists():
        model = {"id": "tiny-demo", "name": "Tiny demo (noise)", "source": "builtin:tiny", "family": "sd15"}
        model |= {"width": 128, "height": 128, "steps": 4, "guidance_scale": 7.5}
        registry.write_text(yaml.safe_dump([model], sort_keys=False), encoding="utf-8")
    values: dict[str, Any] = {"models_file": registry, "output_dir": folder / "outputs", "default_model": "tiny-demo"}
    return Settings(**(values | overrides))
