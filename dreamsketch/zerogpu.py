"""ZeroGPU Spaces (SPACES_ZERO_GPU set): each pipeline call runs under `spaces.GPU`, which leases a GPU and runs the
call in a forked worker process. What crosses between the processes is pickled: the request goes in; its steps
(each with its preview, made in the worker), then the generation or the error, come back. A cancel cannot reach the
worker: the caller stops waiting at once, and the worker's call runs to its end, its pictures dropped."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image

from dreamsketch.config import Settings
from dreamsketch.engine import (
    CANCEL_POLL_S,
    PREVIEW_INTERVAL_S,
    Generation,
    GenerationCancelled,
    GenerationError,
    LocalEngine,
    Step,
    StepCallback,
)
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import Registry
from dreamsketch.request import GenerationRequest

log = logging.getLogger(__name__)

MAX_LEASE_S = 300  # the longest GPU lease ZeroGPU grants a call


def on_zero_gpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def start_up() -> None:
    """ZeroGPU's start-up, which Gradio's `Blocks.launch` runs and DreamSketch's own server does not call: it packs
    the weights loaded so far for the workers, which take them from there at each lease, and tells ZeroGPU that the
    Space has started."""
    import spaces  # present on Spaces only

    spaces.zero.startup()


def lease_seconds(request: GenerationRequest) -> int:
    """The GPU time to ask ZeroGPU for: loading and warming up, then the steps at the request's size and batch."""
    megapixels = request.width * request.height / 1_000_000
    return int(min(MAX_LEASE_S, 20 + request.steps * request.batch_size * megapixels * 0.4))


@dataclass
class RelayedStep(Step):
    """A Step as it comes from the worker: the latents stay there, their preview (if one was due) comes along."""

    image: Image.Image | None = None

    def preview(self) -> Image.Image | None:
        return self.image


Relayed = RelayedStep | Generation | BaseException


class ZeroGpuEngine(LocalEngine):
    """Pipeline calls one at a time, each under a GPU lease, without merging requests into batches. Models load in
    the main process (ZeroGPU keeps their weights for the workers); the worker runs the pipeline call alone."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        import spaces  # present on Spaces only; before the device is chosen (it makes CUDA look present)

        super().__init__(settings, registry)
        if self.cache.compile:
            log.warning("DREAMSKETCH_COMPILE=1 is ignored on ZeroGPU: each call runs in a new worker process")
        self.cache.compile = self.cache.graphs = False  # a worker's captures and compiled code would die with it
        self._lease = threading.Lock()  # one call at a time: ZeroGPU's queue is per call, the Space's own is this
        self._on_gpu: Callable[[GenerationRequest], Iterator[Relayed]] = spaces.GPU(duration=lease_seconds)(
            self._pipeline_call
        )

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Generation:
        request = request.with_seed()
        while not self._lease.acquire(timeout=CANCEL_POLL_S):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled
        try:
            if on_start is not None:
                on_start()
            self.preload(request.model_id)  # here, before a worker is forked: it gets the weights with its memory
            for item in self._on_gpu(request):
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled
                if isinstance(item, RelayedStep):
                    if on_step is not None:
                        on_step(item)
                    continue
                if isinstance(item, BaseException):
                    raise item
                return item
            raise GenerationError("The GPU worker ended without a picture; try again.")
        finally:
            self._lease.release()

    def _pipeline_call(self, request: GenerationRequest) -> Iterator[Relayed]:
        """In the worker: the pipeline call in a thread of its own, its steps relayed as they come. It takes none of
        the engine's locks, which the fork copied in whatever state they were."""
        items: queue.SimpleQueue[Relayed] = queue.SimpleQueue()
        last_preview = -math.inf

        def relay(step: Step) -> None:
            nonlocal last_preview
            image = None
            if time.monotonic() - last_preview >= PREVIEW_INTERVAL_S:
                image, last_preview = step.preview(), time.monotonic()
            items.put(RelayedStep(step.step, step.total, None, step.family, image))

        def run() -> None:
            try:
                items.put(self.run_alone(request, relay))
            except BaseException as exc:  # handed to the main process, which raises it
                items.put(exc)

        threading.Thread(target=run, name="dreamsketch-zerogpu", daemon=True).start()
        while True:
            item = items.get()
            if isinstance(item, BaseException) and not isinstance(item, RELAYED_ERRORS):
                log.error("generation failed on the GPU worker", exc_info=item)
                item = RuntimeError(f"{type(item).__name__} on the GPU worker: {item}")  # whatever it was, picklable
            yield item
            if not isinstance(item, RelayedStep):
                return


# Errors whose own message is for the user and which pickle as they are; any other becomes a RuntimeError.
RELAYED_ERRORS = (GenerationCancelled, GenerationError, ModelUnavailableError)
