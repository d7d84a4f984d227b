"""ZeroGPU Spaces, with a stand-in `spaces` that does what matters of the real one (spaces 0.51): the decorated call
runs in a forked worker process, and its arguments and everything it yields cross between the processes pickled."""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import socket
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from dreamsketch.engine import GenerationCancelled, LocalEngine
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import load_registry
from dreamsketch.server import StudioServer, create_server, serve
from dreamsketch.studio import Studio
from dreamsketch.zerogpu import ZeroGpuEngine, lease_seconds

FORK = multiprocessing.get_context("fork")


class ForkingGPU:
    """spaces.GPU(duration=...): each call forks a worker, sends it the arguments pickled, and yields what the
    worker's generator yields, unpickled."""

    leases: list[int] = []

    def __init__(self, duration: Callable[..., int]) -> None:
        self.duration = duration

    def __call__(self, task: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def leased(*args: Any, **kwargs: Any) -> Iterator[Any]:
            ForkingGPU.leases.append(self.duration(*args, **kwargs))
            arguments = pickle.dumps((args, kwargs))  # the real one's queue pickles them: a closure fails here
            here, there = FORK.Pipe()
            worker = FORK.Process(target=work, args=(task, arguments, there))
            worker.start()
            there.close()
            try:
                while True:
                    try:
                        yield here.recv()
                    except EOFError:
                        return
            finally:
                worker.join(60)

        return leased


def work(task: Callable[..., Iterator[Any]], arguments: bytes, connection: Any) -> None:
    args, kwargs = pickle.loads(arguments)
    for item in task(*args, **kwargs):
        connection.send(item)
    connection.close()


@pytest.fixture
def zero_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setitem(__import__("sys").modules, "spaces", types.SimpleNamespace(GPU=ForkingGPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    ForkingGPU.leases = []
    return ForkingGPU.leases


def test_a_generation_runs_in_the_worker_and_its_steps_and_pictures_come_back(zero_gpu, settings) -> None:  # type: ignore[no-untyped-def]
    studio = Studio(settings)
    assert isinstance(studio.engine, ZeroGpuEngine)
    request = studio.parse({"prompt": "a fox", "seed": 7, "steps": 3, "batch_size": 2}, "txt2img")
    steps = []
    result = studio.generate(request, on_step=lambda step: steps.append((step.step, step.total, step.preview())))
    assert zero_gpu == [lease_seconds(request)]
    assert [(step, total) for step, total, _ in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[0][2] is not None and steps[0][2].size == (16, 16)  # the first step's preview, made in the worker
    plain = LocalEngine(settings, load_registry(settings.models_file)).generate(request)
    for made, expected in zip(result.generation.images, plain.images, strict=True):
        assert np.array_equal(np.asarray(made), np.asarray(expected))
    assert [entry.meta.seed for entry in result.entries] == [7, 8] and studio.gallery.count() == 2


def test_errors_cross_with_their_messages(zero_gpu, settings) -> None:  # type: ignore[no-untyped-def]
    studio = Studio(settings)
    with pytest.raises(ModelUnavailableError, match="'uncached-hub'.*not in the local cache"):
        studio.generate(studio.parse({"prompt": "x", "model_id": "uncached-hub"}, "txt2img"))
    assert studio.gallery.count() == 0


def test_a_cancel_stops_the_wait_and_saves_nothing(zero_gpu, settings) -> None:  # type: ignore[no-untyped-def]
    studio = Studio(settings)
    cancel = threading.Event()

    def cancel_at_the_second_step(step: Any) -> None:
        if step.step == 2:
            cancel.set()

    request = studio.parse({"prompt": "x", "steps": 20}, "txt2img")
    with pytest.raises(GenerationCancelled):
        studio.generate(request, on_step=cancel_at_the_second_step, cancel=cancel)
    assert studio.gallery.count() == 0
    assert studio.generate(studio.parse({"prompt": "after", "steps": 2}, "txt2img")).entries  # the lease was freed


def test_a_model_loads_in_the_main_process_before_the_worker_is_forked(zero_gpu, settings) -> None:  # type: ignore[no-untyped-def]
    """Each worker loaded a model other than the default itself, inside its GPU lease, and kept it to itself."""
    studio = Studio(settings)
    studio.generate(studio.parse({"prompt": "x", "steps": 2, "model_id": "tiny-folder"}, "txt2img"))
    assert studio.engine.loaded_ids() == ["tiny-folder"]


def serve_with_stand_ins(
    studio: Studio, monkeypatch: pytest.MonkeyPatch, start_up: Callable[[], None], serving: Callable[[], None]
) -> None:
    """serve(), with spaces' start-up and uvicorn's serving replaced by `start_up` and `serving`."""
    app, _demo = create_server(studio)
    monkeypatch.setattr(sys.modules["spaces"], "zero", types.SimpleNamespace(startup=start_up), raising=False)

    def run(server: StudioServer, sockets: list[socket.socket]) -> None:
        serving()
        sockets[0].close()

    monkeypatch.setattr(StudioServer, "run", run)
    serve(studio, app)


def test_serving_runs_zero_gpus_start_up_once_the_default_model_has_loaded(zero_gpu, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """spaces' start-up (it packs the weights loaded so far for the workers and reports the Space started) runs from
    Gradio's Blocks.launch, which DreamSketch's own server never calls: it never ran."""
    studio = Studio(dataclasses.replace(settings, server_port=0))
    seen: list[tuple[str, list[str]]] = []
    serve_with_stand_ins(
        studio,
        monkeypatch,
        start_up=lambda: seen.append(("start-up", studio.engine.loaded_ids())),
        serving=lambda: seen.append(("serving", studio.engine.loaded_ids())),
    )
    assert seen == [("start-up", ["tiny-demo"]), ("serving", ["tiny-demo"])]


def test_no_fast_path_on_zero_gpu(zero_gpu, settings, caplog) -> None:  # type: ignore[no-untyped-def]
    """Its CUDA graphs and compiled code would be made again in every call's new worker process, and the main
    process, where models load and warm up, has no GPU there."""
    studio = Studio(dataclasses.replace(settings, compile=True))
    assert not studio.engine.cache.graphs and not studio.engine.cache.compile
    assert "DREAMSKETCH_COMPILE=1 is ignored on ZeroGPU" in caplog.text


def test_a_default_model_that_fails_to_preload_still_lets_the_space_start(zero_gpu, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The preload runs before serving on ZeroGPU: an error it did not expect stopped the Space from starting."""
    studio = Studio(dataclasses.replace(settings, server_port=0))
    seen: list[str] = []
    monkeypatch.setattr(studio.engine, "preload", lambda model_id: (_ for _ in ()).throw(RuntimeError("a bug")))
    serve_with_stand_ins(
        studio, monkeypatch, start_up=lambda: seen.append("start-up"), serving=lambda: seen.append("serving")
    )
    assert seen == ["start-up", "serving"]
