"""Faults at the server level (the engine- and gallery-level cases are in test_engine/test_gallery/test_loading):
out of memory, models that fail to load, a full or read-only disk while saving, a process killed mid-save, cancel
storms. Each time the user gets a clear error, nothing partial is left, and the next request succeeds."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError

from benchmarks.load import server_process
from dreamsketch import gallery as gallery_module
from dreamsketch import pipelines as pipelines_module
from dreamsketch.gallery import TEMP_PREFIX, Gallery
from dreamsketch.studio import Studio
from tests.servers import RunningServer, running_server, tiny_settings

FAST = {"model_id": "tiny-demo", "width": 64, "height": 64, "steps": 1}
SLOW = {"model_id": "tiny-demo", "width": 128, "height": 128, "steps": 150, "batch_size": 4}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path) -> Path:
    """tiny-demo, a folder whose model_index.json is not JSON, and a copy of a real folder with damaged weights."""
    root = tmp_path_factory.mktemp("faults")
    base = {"family": "sd15", "width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}
    (root / "bad-index").mkdir()
    (root / "bad-index" / "model_index.json").write_text("{not json", encoding="utf-8")
    damaged = root / "damaged-weights"
    shutil.copytree(tiny_pipeline_dir, damaged)
    for weights in damaged.glob("unet/*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated: the header promises more than is there
    models = [
        {"id": "tiny-demo", "name": "Tiny demo (noise)", "source": "builtin:tiny", **base},
        {"id": "bad-index", "name": "Bad index", "source": str(root / "bad-index"), **base},
        {"id": "damaged-weights", "name": "Damaged", "source": str(damaged), **base},
    ]
    (root / "models.yaml").write_text(yaml.safe_dump(models), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RunningServer]:
    with running_server(Studio(tiny_settings(folder, max_loaded=2))) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: RunningServer, folder: Path) -> Iterator[Client]:
    client = Client(server.url, verbose=False, download_files=str(folder / "downloads"))
    yield client
    client.close()


def error_of(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["status"] == "error" and set(body) == {"status", "error"} and "Traceback" not in reply.text
    return str(body["error"])


def files_and_rows(gallery: Gallery) -> tuple[set[str], set[str]]:
    on_disk = {p.name for p in gallery.folder.glob("*.png") if not p.name.startswith(".")}
    return on_disk, {entry.file_name for entry in gallery.list(limit=100_000)}


def assert_consistent(gallery: Gallery) -> None:
    on_disk, rows = files_and_rows(gallery)
    assert rows == on_disk, rows ^ on_disk


# ---------------------------------------------------------------------------------------------------------------
# Out of memory


@pytest.fixture
def out_of_memory_once(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next UNet call raises CUDA's OutOfMemoryError; returns a list that counts free_memory calls."""
    server.studio.engine.preload("tiny-demo")
    unet = server.studio.engine.cache.loaded["tiny-demo"].txt2img.unet
    forward, freed = unet.forward, []

    def fail(*args: object, **kwargs: object) -> None:
        unet.forward = forward
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    release = pipelines_module.free_memory
    monkeypatch.setattr(pipelines_module, "free_memory", lambda: (freed.append(1), release())[1])
    monkeypatch.setattr(unet, "forward", fail)
    return freed


def test_out_of_memory_through_the_api_asks_for_less_and_the_next_request_succeeds(
    server: RunningServer, http: httpx.Client, out_of_memory_once: list[int]
) -> None:
    before = server.studio.gallery.count()
    message = error_of(http.post("/api/txt2img", json={**FAST, "batch_size": 2}), 500)
    assert "Out of GPU memory" in message and "lower the size or the batch size" in message
    assert out_of_memory_once == [1] and server.studio.gallery.count() == before
    assert http.post("/api/txt2img", json=FAST).status_code == 200
    assert server.studio.pending == 0


def test_out_of_memory_through_gradio_client_then_the_next_request_succeeds(
    server: RunningServer, client: Client, out_of_memory_once: list[int]
) -> None:
    before = server.studio.gallery.count()
    with pytest.raises(AppError, match=r"^Out of GPU memory at 64x64: lower the size\.$"):
        client.predict(prompt="too big", **FAST, api_name="/txt2img")
    assert out_of_memory_once == [1] and server.studio.gallery.count() == before
    _images, info = client.predict(prompt="fits", **FAST, api_name="/txt2img")
    assert server.studio.gallery.get(info["ids"][0]) is not None


# ---------------------------------------------------------------------------------------------------------------
# Models whose weights fail to load


@pytest.mark.parametrize("broken", ["bad-index", "damaged-weights"])
def test_a_model_that_fails_to_load_leaves_the_others_working(
    server: RunningServer, http: httpx.Client, client: Client, broken: str
) -> None:
    assert http.post("/api/txt2img", json=FAST).status_code == 200
    before = server.studio.gallery.count()
    for _ in range(2):  # the second try fails the same way: nothing half-loaded was kept
        message = error_of(http.post("/api/txt2img", json={**FAST, "model_id": broken}), 503)
        assert f"Model '{broken}'" in message and "cannot be loaded" in message and "tiny-demo" in message
        assert broken not in server.studio.engine.loaded_ids()
    with pytest.raises(AppError, match=f"Model '{broken}'"):
        client.predict(prompt="x", **{**FAST, "model_id": broken}, api_name="/txt2img")
    assert server.studio.gallery.count() == before
    assert http.post("/api/txt2img", json=FAST).status_code == 200
    models = {m["id"]: m for m in http.get("/api/models").json()["models"]}
    assert not models[broken]["loaded"] and models["tiny-demo"]["loaded"]


# ---------------------------------------------------------------------------------------------------------------
# Disk full, read-only gallery


def _fail_with(code: int) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("target", "code"),
    [("fsync", errno.ENOSPC), ("replace", errno.ENOSPC), ("open", errno.EROFS), ("replace", errno.EROFS)],
)
def test_disk_full_or_read_only_while_saving_reports_and_leaves_nothing(
    server: RunningServer, http: httpx.Client, client: Client, monkeypatch: pytest.MonkeyPatch, target: str, code: int
) -> None:
    gallery = server.studio.gallery
    before = gallery.count()
    if target == "open":
        monkeypatch.setattr(gallery_module, "open", _fail_with(code), raising=False)
    else:
        monkeypatch.setattr(gallery_module.os, target, _fail_with(code))
    message = error_of(http.post("/api/txt2img", json=FAST), 500)
    with pytest.raises(AppError, match=f"could not save image .*{os.strerror(code)}"):  # the browser's path too
        client.predict(prompt="x", **FAST, api_name="/txt2img")
    monkeypatch.undo()
    assert "could not save image" in message and os.strerror(code) in message and str(gallery.folder) not in message
    assert gallery.count() == before and not list(gallery.folder.glob(f"{TEMP_PREFIX}*"))
    assert_consistent(gallery)
    assert http.post("/api/txt2img", json=FAST).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Killed in the middle of saving (a real process, SIGKILL)

KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from PIL import Image
    from dreamsketch import gallery as g

    folder, stage = sys.argv[1], sys.argv[2]
    ready = os.path.join(folder, "..", "ready")
    gallery = g.Gallery(folder)
    meta = g.ImageMeta("killed", "", "tiny-demo", 8, 8, 1, 7.5, 1, "Euler")

    def stop(*args, **kwargs):
        open(ready, "w").close()
        time.sleep(600)

    if stage == "before-rename":  # the temporary file is written and fsynced, not yet renamed
        g.os.replace = stop
    elif stage == "after-rename":  # the PNG is in place, its index row not yet written
        g.Gallery._insert = stop
    else:  # saving in a loop, killed wherever it happens to be
        open(ready, "w").close()
    while True:
        gallery.save(Image.new("RGB", (8, 8)), meta)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["before-rename", "after-rename", "loop"])
def test_a_writer_killed_mid_save_leaves_a_consistent_gallery(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "outputs"
    Gallery(folder).save(gallery_module.Image.new("RGB", (8, 8)), gallery_module.ImageMeta(
        "kept", "", "tiny-demo", 8, 8, 1, 7.5, 1, "Euler"))  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(folder), stage], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the writer did not reach its stage"
        time.sleep(0.02)
    if stage == "loop":
        time.sleep(1.0)  # many saves, killed wherever it happens to be
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    temps = list(folder.glob(f"{TEMP_PREFIX}*"))
    if stage == "before-rename":
        assert temps, "the kill should have left a temporary file"
    restarted = Gallery(folder)
    assert_consistent(restarted)
    listed = {entry.file_name for entry in restarted.list(limit=100_000)}
    assert not any(name.startswith(TEMP_PREFIX) for name in listed)
    assert all(restarted.file_path(temp.name) is None for temp in temps)
    assert "kept" in {entry.meta.prompt for entry in restarted.list(limit=100_000)}
    if stage == "after-rename":  # the PNG carries its metadata: reopening indexes it
        assert restarted.count() == 2 and "killed" in {entry.meta.prompt for entry in restarted.list()}


def test_a_server_restarted_after_a_killed_save_shows_no_temporary_file(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    folder = settings.output_dir
    folder.mkdir(parents=True)
    (folder / f"{TEMP_PREFIX}deadbeef.png").write_bytes(b"\x89PNG\r\n\x1a\n partial")
    with running_server(Studio(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/api/txt2img", json=FAST).status_code == 200
        names = [r["url"].rsplit("/", 1)[1] for r in http.get("/api/results").json()["results"]]
        assert names and not any(name.startswith(TEMP_PREFIX) for name in names)
        assert http.get(f"/media/generated/{TEMP_PREFIX}deadbeef.png").status_code == 404
        assert_consistent(server.studio.gallery)


# ---------------------------------------------------------------------------------------------------------------
# Cancel storms


def wait_until_idle(server: RunningServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.studio.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.studio.pending == 0, f"{server.studio.pending} requests still pending after the storm"


@pytest.mark.slow
def test_a_cancel_storm_through_gradio_client_drains_and_the_next_request_succeeds(
    server: RunningServer, client: Client
) -> None:
    jobs = []
    for i in range(24):
        job = client.submit(prompt=f"storm {i}", **SLOW, api_name="/txt2img")
        if i % 3 == 0:
            time.sleep(0.05)  # some have started by the time they are cancelled
        jobs.append(job)
        if i % 2:
            job.cancel()
    for job in jobs:
        job.cancel()
    wait_until_idle(server)
    _images, info = client.predict(prompt="after the storm", **FAST, api_name="/txt2img")
    assert server.studio.gallery.get(info["ids"][0]) is not None
    assert_consistent(server.studio.gallery)


@pytest.mark.slow
def test_a_storm_of_abandoned_http_requests_drains_and_the_next_request_succeeds(server: RunningServer) -> None:
    def abandon() -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/api/txt2img", json=SLOW, timeout=0.3)

    threads = [threading.Thread(target=abandon) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until_idle(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/api/txt2img", json=FAST).status_code == 200
    assert_consistent(server.studio.gallery)


# ---------------------------------------------------------------------------------------------------------------
# Clients that go away, requests that give up, a server that stops

LONG = {"model_id": "tiny-demo", "width": 128, "height": 128, "steps": 150, "batch_size": 8}
KILLED_CLIENT = """
import json, sys, time
from gradio_client import Client
client = Client(sys.argv[1], verbose=False, download_files=sys.argv[2])
job = client.submit(prompt="a client that will be killed", **json.loads(sys.argv[3]), api_name="/txt2img")
while not job.status().progress_data and not job.done():
    time.sleep(0.05)
print(f"failed: {job.exception()}" if job.done() else "running", flush=True)
time.sleep(600)
"""


def test_a_killed_gradio_client_frees_the_device_and_saves_nothing(server: RunningServer, folder: Path) -> None:
    """Gradio stopped a closed browser tab's generation but let a gone gradio_client's call run to its end."""
    wait_until_idle(server)
    before = server.studio.gallery.count()
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, server.url, str(folder / "downloads"), json.dumps(LONG)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "running"
        assert server.studio.pending == 1
    finally:
        child.kill()
        child.wait()
    wait_until_idle(server, timeout=30)  # the 150 steps of 8 pictures take far longer on a CPU
    assert server.studio.gallery.count() == before
    assert_consistent(server.studio.gallery)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_while_generating_answers_the_caller_and_ends_the_server(tmp_path: Path, sig: int) -> None:
    """Ctrl-C waited for the running generation, saved its pictures and cut its caller off with a plain 500."""
    replies: list[httpx.Response] = []
    with server_process(tmp_path, queue_size=4) as (url, process):
        caller = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{url}/api/txt2img", json=LONG, timeout=120))
        )
        caller.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/status", timeout=10).json()["queue_length"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        time.sleep(1)  # into the denoising steps
        process.send_signal(sig)
        process.wait(timeout=30)  # psutil: raises TimeoutExpired if it is still running
        caller.join(30)
    assert "shutting down" in error_of(replies[0], 503)
    assert list((tmp_path / "outputs").glob("*.png")) == []
