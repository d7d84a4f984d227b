"""Launch the real server (HTTP API + Gradio UI + MCP) under uvicorn in a thread, on a free 127.0.0.1 port."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from gradio_client import Client

from dreamsketch.config import Settings
from dreamsketch.server import create_server
from dreamsketch.server import running_server as serving
from dreamsketch.studio import Studio


@dataclass
class RunningServer:
    url: str
    studio: Studio


@contextmanager
def running_server(studio: Studio) -> Iterator[RunningServer]:
    """The real server (HTTP API + Gradio UI + MCP) for `studio`, on a free 127.0.0.1 port."""
    app, _demo = create_server(studio)
    with serving(app) as url:
        httpx.get(f"{url}/gradio_api/mcp/schema", timeout=10)  # the app answers (auth may refuse this one)
        yield RunningServer(url, studio)


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


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (httpx would normalise dot segments and refuse NUL)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextmanager
def gradio_client(server: RunningServer) -> Iterator[Client]:
    """A gradio_client for the server; its downloads go next to the gallery, not into the working directory."""
    client = Client(server.url, verbose=False, download_files=str(server.studio.settings.output_dir.parent / "dl"))
    try:
        yield client
    finally:
        client.close()
