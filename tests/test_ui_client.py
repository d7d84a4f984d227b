"""The Gradio app as gradio_client users reach it: a real server on a free port, called by keyword."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from dreamsketch.studio import Studio
from tests.servers import RunningServer, gradio_client, running_server, tiny_settings

FAST = {"model_id": "tiny-demo", "width": 128, "height": 128, "steps": 2}
SLOW = {"model_id": "tiny-demo", "width": 256, "height": 256, "steps": 150, "batch_size": 8}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-client")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RunningServer]:
    with running_server(Studio(tiny_settings(folder))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    with gradio_client(server) as client:
        yield client


def wait_for_progress(job, timeout: float = 30.0) -> list:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = job.status().progress_data
        if progress:
            return progress
        time.sleep(0.05)
    raise AssertionError("no progress reported")


def test_named_endpoints_have_the_documented_parameters(client: Client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {name: [p["parameter_name"] for p in spec["parameters"]] for name, spec in endpoints.items()}
    assert names == {
        "/txt2img": [
            "prompt", "negative_prompt", "model_id", "width", "height", "steps", "guidance_scale", "seed",
            "scheduler", "batch_size",
        ],
        "/img2img": [
            "image", "prompt", "negative_prompt", "model_id", "strength", "width", "height", "steps",
            "guidance_scale", "seed", "scheduler", "batch_size",
        ],
    }  # fmt: skip


def test_txt2img_by_keyword(client: Client, server: RunningServer) -> None:
    images, info = client.predict(
        prompt="a lighthouse", negative_prompt="blurry", seed=1234, batch_size=2, scheduler="Euler", **FAST,
        guidance_scale=5.0, api_name="/txt2img",
    )  # fmt: skip
    assert info["seeds"] == [1234, 1235]
    assert info["parameters"]["scheduler"] == "Euler" and info["parameters"]["prompt"] == "a lighthouse"
    assert [item["caption"] for item in images] == ["seed 1234", "seed 1235"]
    for item, entry_id in zip(images, info["ids"], strict=True):
        with Image.open(item["image"]) as image:
            assert image.size == (128, 128)
        assert server.studio.gallery.get(entry_id) is not None


def test_pictures_are_served_from_the_gallery_not_copied_into_gradios_cache(
    client: Client, server: RunningServer
) -> None:
    """Gradio copied every picture it returned into its upload folder and never deleted the copies."""
    _images, info = client.predict(prompt="served in place", **FAST, api_name="/txt2img")
    file_name = server.studio.gallery.get(info["ids"][0]).file_name
    assert list(Path(get_upload_folder()).rglob(file_name)) == []


def test_img2img_by_keyword(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "input.png"
    Image.new("RGB", (200, 150), "orange").save(source)
    images, info = client.predict(
        image=handle_file(str(source)), prompt="a watercolor", strength=0.5, seed=7, **FAST, api_name="/img2img"
    )
    assert info["seeds"] == [7] and info["parameters"]["strength"] == 0.5
    with Image.open(images[0]["image"]) as image:
        assert image.size == (128, 128)


def test_progress_is_reported_while_a_job_runs(client: Client) -> None:
    job = client.submit(prompt="progress", **(FAST | {"steps": 30}), api_name="/txt2img")
    progress = wait_for_progress(job)
    assert progress[0].length == 30 and progress[0].unit == "steps"
    _images, info = job.result(timeout=60)
    assert len(info["seeds"]) == 1


def test_cancel_stops_the_job_and_the_next_request_succeeds(client: Client, server: RunningServer) -> None:
    before = server.studio.gallery.count()
    job = client.submit(prompt="slow", **SLOW, api_name="/txt2img")
    wait_for_progress(job)
    assert job.cancel()
    _images, info = client.predict(prompt="after cancel", **FAST, api_name="/txt2img")
    # Had the slow job gone on, it would have finished first (one device, first come) and saved its image too.
    assert server.studio.gallery.count() == before + 1 and info["ids"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 500}, "width"),
        ({"steps": 0}, "steps"),
        ({"model_id": "no-such-model"}, "model_id"),
        ({"scheduler": "Turbo 9000"}, "scheduler"),
        ({"guidance_scale": 31}, "guidance_scale"),
    ],
)
def test_bad_inputs_name_the_field(client: Client, fields: dict, field: str) -> None:
    with pytest.raises(AppError, match=f"field '{field}'"):
        client.predict(prompt="x", **(FAST | fields), api_name="/txt2img")


def test_img2img_needs_an_image(client: Client) -> None:
    with pytest.raises(AppError, match="field 'image'"):
        client.predict(image=None, prompt="x", **FAST, api_name="/img2img")


def test_server_still_answers_after_errors(client: Client, server: RunningServer) -> None:
    with pytest.raises(AppError):
        client.predict(prompt="x", steps=0, api_name="/txt2img")
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    _images, info = client.predict(prompt="still fine", **FAST, api_name="/txt2img")
    assert info["ids"]


def test_queue_full_is_an_error(tmp_path: Path) -> None:
    with running_server(Studio(tiny_settings(tmp_path, queue_size=1))) as busy:
        client = Client(busy.url, verbose=False, download_files=str(tmp_path / "dl"))
        running = client.submit(prompt="slow", **SLOW, api_name="/txt2img")
        wait_for_progress(running)
        # GPU_CONCURRENCY (8) generations in flight, then queue_size (1) waiting in Gradio's queue, then refusals.
        waiting = [client.submit(prompt=f"wait {i}", **FAST, api_name="/txt2img") for i in range(10)]
        deadline = time.monotonic() + 20
        while not any(job.done() for job in waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [job for job in waiting if job.done()]
        assert refused, "no submission was refused"
        with pytest.raises(QueueError, match="(?i)queue is full"):
            refused[0].result()
        for job in (running, *waiting):
            job.cancel()
        client.close()


def test_gallery_survives_a_restart(client: Client, folder: Path) -> None:
    _images, info = client.predict(prompt="remember me", **FAST, api_name="/txt2img")
    entry_id = info["ids"][0]
    with running_server(Studio(tiny_settings(folder))) as again:
        entry = again.studio.gallery.get(entry_id)
        assert entry is not None and entry.meta.prompt == "remember me"
        reply = httpx.get(f"{again.url}/api/results/", params={"limit": 5}, timeout=10)
        assert reply.status_code == 200
        assert entry_id in [result["id"] for result in reply.json()["results"]]


def test_auth_protects_the_app(tmp_path: Path) -> None:
    with running_server(Studio(tiny_settings(tmp_path, auth=("ada", "s3cret")))) as locked:
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a plain ValueError/AuthenticationError)
            Client(locked.url, verbose=False)
        client = Client(locked.url, auth=("ada", "s3cret"), verbose=False, download_files=str(tmp_path / "dl"))
        _images, info = client.predict(prompt="with auth", **FAST, api_name="/txt2img")
        assert info["ids"]
        client.close()


def test_mcp_tools_generate(server: RunningServer) -> None:
    """Agents see txt2img/img2img as MCP tools (described by the docstrings) and can call txt2img."""
    import anyio
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    schema = httpx.get(f"{server.url}/gradio_api/mcp/schema", timeout=10).json()
    tools = {tool["name"]: tool for tool in schema}
    assert {"txt2img", "img2img"} <= set(tools)
    assert "multiple of 8" in tools["txt2img"]["inputSchema"]["properties"]["width"]["description"]

    async def call() -> list:
        async with (
            streamablehttp_client(f"{server.url}/gradio_api/mcp/") as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            picture = await session.call_tool("img2img", {"image": data_url, "prompt": "via mcp img2img", **FAST})
            assert not picture.isError, picture.content  # the README's way: a data URL
            reply = await session.call_tool("txt2img", {"prompt": "via mcp", **FAST, "seed": 5})
            assert not reply.isError, reply.content
            return reply.content

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = anyio.run(call)
    assert any(item.type == "image" or "seed" in getattr(item, "text", "") for item in content), content
    assert [entry.meta.prompt for entry in server.studio.gallery.list(limit=2)] == ["via mcp", "via mcp img2img"]


def test_mcp_tool_calls_stay_on_this_server_behind_a_proxy(tmp_path: Path) -> None:
    """Gradio's MCP server made its own client for the first call's forwarded host: behind Spaces' proxy tool calls
    went out through it, and a caller could point them (and DREAMSKETCH_AUTH's credentials) anywhere."""
    import anyio
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    forwarded = {"x-forwarded-host": "nowhere.invalid", "x-forwarded-proto": "https"}

    async def call(url: str) -> Any:
        async with (
            streamablehttp_client(f"{url}/gradio_api/mcp/", headers=forwarded) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool("txt2img", {"prompt": "behind a proxy", **FAST, "seed": 5})

    with running_server(Studio(tiny_settings(tmp_path))) as server:
        reply = anyio.run(call, server.url)
        assert not reply.isError, reply.content
        assert [entry.meta.prompt for entry in server.studio.gallery.list(limit=1)] == ["behind a proxy"]


@pytest.mark.parametrize(("interval", "computed"), [(0.0, 6), (3600.0, 1)])
def test_live_previews_are_throttled_and_the_first_step_has_one(monkeypatch, interval: float, computed: int) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import torch

    import dreamsketch.engine
    from dreamsketch.engine import Step
    from dreamsketch.ui import Progressed, run_generation

    made = []
    real_preview = dreamsketch.engine.latent_preview
    monkeypatch.setattr("dreamsketch.ui.PREVIEW_INTERVAL_S", interval)
    monkeypatch.setattr("dreamsketch.engine.latent_preview", lambda *a: made.append(1) or real_preview(*a))

    def generate(request, on_step, cancel):  # type: ignore[no-untyped-def]
        for index in range(6):
            on_step(Step(index + 1, 6, torch.zeros(1, 4, 8, 8), "sd15"))
        return "result"

    async def collect() -> list:
        return [item async for item in run_generation(generate, None, True, discard=pytest.fail)]

    items = asyncio.run(collect())
    assert len(made) == computed
    assert items[-1] == "result" and all(isinstance(item, Progressed) for item in items[:-1])
    if len(items) > 1:  # the consumer may have been late for every step: then only the result comes
        assert items[0].preview is not None  # step 1's, or carried into the item that replaced it


@pytest.mark.parametrize("arrives", ["after the consumer has gone", "before the consumer takes it"])
def test_a_result_saved_just_as_its_consumer_went_is_taken_back(arrives: str) -> None:
    """A Cancel that reached the server just after a batch was saved said "nothing was saved" while the pictures
    stayed in the gallery, seen by no one."""
    import asyncio

    from dreamsketch.ui import run_generation

    go, saved, discarded = threading.Event(), threading.Event(), []

    def generate(request, on_step, cancel):  # type: ignore[no-untyped-def]
        (cancel if arrives == "after the consumer has gone" else go).wait(10)  # saved just as the cancel came
        saved.set()
        return "result"

    async def cancel_the_consumer() -> None:
        consumer = asyncio.ensure_future(anext(run_generation(generate, None, False, discarded.append)))
        await asyncio.sleep(0.2)  # the consumer waits for its items
        if arrives == "before the consumer takes it":
            go.set()
            saved.wait(10)
            time.sleep(0.1)  # the event loop held meanwhile: the result is put in the queue, not taken out
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    asyncio.run(cancel_the_consumer())
    deadline = time.monotonic() + 10
    while not discarded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert discarded == ["result"]


def test_the_browsers_stream_yields_only_previews_each_before_its_progress(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every yield hides Gradio's progress bar until the next progress message: yielding "nothing new" each step,
    and each preview after its step's progress, left the bar visible 45 % of a generation (97 % now)."""
    import asyncio

    import torch

    from dreamsketch.engine import Step
    from dreamsketch.ui import Handlers

    monkeypatch.setattr("dreamsketch.ui.PREVIEW_INTERVAL_S", 3600)  # a preview at the first step only
    studio = Studio(tiny_settings(tmp_path))
    handlers = Handlers(studio)
    result = studio.generate(studio.parse({"prompt": "x", "steps": 1}, "txt2img"))

    def generate(request, on_step, cancel):  # type: ignore[no-untyped-def]
        for index in range(6):
            on_step(Step(index + 1, 6, torch.zeros(1, 4, 16, 16), "sd15"))
            time.sleep(0.02)  # the consumer sees every step
        return result

    handlers.generate = generate
    events: list[str] = []

    async def run() -> None:
        async for _preview, results, _info, _selected in handlers.stream("txt2img", {"prompt": "x"}, progress):
            events.append("result" if isinstance(results, list) else "preview")

    def progress(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        events.append("progress")

    asyncio.run(run())
    assert events[0] == "progress"  # "Waiting for the device"
    assert events[1:3] == ["preview", "progress"] and events[-1] == "result"
    assert events.count("preview") == 1 and events.count("progress") == 7


def test_concurrent_gradio_requests_reach_the_engine_together_and_share_a_batch(
    client: Client, server: RunningServer
) -> None:
    engine = server.studio.engine
    with engine.lock:  # the device is busy: requests pile up in the engine (Gradio lets several through at once)
        jobs = [client.submit(prompt=f"together {i}", seed=i, **FAST, api_name="/txt2img") for i in range(3)]
        deadline = time.monotonic() + 30
        while len(engine._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(engine._waiting) == 3, "Gradio did not let the requests through together"
    infos = [job.result(timeout=60)[1] for job in jobs]
    assert [info["seeds"] for info in infos] == [[0], [1], [2]]
    assert len({entry_id for info in infos for entry_id in info["ids"]}) == 3


def test_left_out_size_steps_and_guidance_are_the_chosen_models_own(tmp_path: Path) -> None:
    """They were the default model's, whichever model a caller named."""
    wide = {"id": "tiny-wide", "name": "Tiny wide", "source": "builtin:tiny", "family": "sd15"}
    wide |= {"width": 192, "height": 128, "steps": 3, "guidance_scale": 5.0}
    settings = tiny_settings(tmp_path)
    settings.models_file.write_text(
        settings.models_file.read_text(encoding="utf-8") + yaml.safe_dump([wide], sort_keys=False), encoding="utf-8"
    )
    with running_server(Studio(settings)) as server, gradio_client(server) as client:
        images, info = client.predict(prompt="a fox", model_id="tiny-wide", api_name="/txt2img")
        assert {key: info["parameters"][key] for key in ("width", "height", "steps", "guidance_scale")} == {
            "width": 192, "height": 128, "steps": 3, "guidance_scale": 5.0
        }  # fmt: skip
        with Image.open(images[0]["image"]) as image:
            assert image.size == (192, 128)
