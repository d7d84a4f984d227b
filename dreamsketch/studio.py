"""The studio: registry + engine + gallery behind one object that the UI, HTTP API and CLI share."""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import diffusers
import torch
import transformers

from dreamsketch import __version__
from dreamsketch.config import Settings, SettingsError
from dreamsketch.engine import Generation, GenerationCancelled, LocalEngine, StepCallback
from dreamsketch.fastpath import stop_compiling
from dreamsketch.gallery import Gallery, GalleryEntry, ImageMeta
from dreamsketch.pipelines import is_available
from dreamsketch.registry import Registry, load_registry
from dreamsketch.remote import RemoteEngine
from dreamsketch.request import GenerationRequest, Mode, parse_request
from dreamsketch.zerogpu import ZeroGpuEngine, on_zero_gpu

log = logging.getLogger(__name__)
OFFLINE_MODELS = ("tiny-shapes", "tiny-demo")
SHUTTING_DOWN = "the server is shutting down; try again in a moment"


class StudioBusy(RuntimeError):
    """More requests are waiting than DREAMSKETCH_QUEUE_SIZE allows, or the server is shutting down."""


@dataclass
class StudioResult:
    generation: Generation
    entries: list[GalleryEntry]

    @property
    def warnings(self) -> list[str]:
        return self.generation.warnings


def choose_default_model(settings: Settings, registry: Registry) -> str:
    """DREAMSKETCH_DEFAULT_MODEL; else the first user model usable now; else the bundled offline model."""
    if settings.default_model is not None:
        if settings.default_model not in registry:
            raise SettingsError(
                f"DREAMSKETCH_DEFAULT_MODEL={settings.default_model!r}: not in {registry.path} "
                f"(known: {', '.join(registry.ids())})"
            )
        log.info("default model: %s (DREAMSKETCH_DEFAULT_MODEL)", settings.default_model)
        return settings.default_model
    if not settings.use_local_models:
        return remote_default_model(settings, registry)
    for spec in registry:
        if spec.id not in OFFLINE_MODELS and spec.source_kind != "builtin" and is_available(spec):
            log.info("default model: %s (its weights are usable now)", spec.id)
            return spec.id
    offline = [registry.get(model_id) for model_id in OFFLINE_MODELS if model_id in registry]
    for spec in [*offline, *(spec for spec in registry if spec.source_kind == "builtin")]:
        if is_available(spec):
            log.info("default model: %s (no other model's weights are cached or downloadable now)", spec.id)
            return spec.id
    first = next(iter(registry)).id  # the app starts, shows each model's state and says why on Generate
    log.warning("no model in %s is usable now (add tiny-demo, source: builtin:tiny); default: %s", registry.path, first)
    return first


def remote_default_model(settings: Settings, registry: Registry) -> str:
    """With USE_LOCAL_MODELS=false: the first Hub model (the Inference API runs those only), or the first model at
    all for an endpoint of one's own (DREAMSKETCH_INFERENCE_API_URL, which serves whatever it serves)."""
    for spec in registry:
        if settings.inference_api_url or spec.source_kind == "hub":
            log.info("default model: %s (the first the Inference API can run)", spec.id)
            return spec.id
    raise SettingsError(f"USE_LOCAL_MODELS=false: no model in {registry.path} has a Hub repo id as its source")


class Studio:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.registry = load_registry(self.settings.models_file)
        engine_class: type[LocalEngine | RemoteEngine] = RemoteEngine
        if self.settings.use_local_models:
            engine_class = ZeroGpuEngine if on_zero_gpu() else LocalEngine
        self.engine = engine_class(self.settings, self.registry)
        self.gallery = Gallery(self.settings.output_dir)
        self.default_model = choose_default_model(self.settings, self.registry)
        self._pending = 0  # requests running or waiting for the device
        self._waiting = 0  # of those, the ones waiting for the device without a queue of their own
        self._pending_lock = threading.Lock()
        self._cancels: set[threading.Event] = set()  # one per running or waiting request
        self.closing = threading.Event()

    def parse(self, fields: Mapping[str, Any], mode: Mode) -> GenerationRequest:
        return parse_request(fields, self.registry, mode, self.default_model)

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        own_queue: bool = False,
    ) -> StudioResult:
        """Run the request, then save its images to the gallery (outside the device lock).

        Raises StudioBusy when DREAMSKETCH_QUEUE_SIZE requests are already waiting for the device, counting only
        requests without `own_queue` (Gradio's events come through Gradio's queue, which has the same bound), or
        when the server is shutting down; GenerationCancelled when `cancel` is set before the last picture is saved
        (the ones saved are taken back)."""
        cancel = cancel or threading.Event()
        counted = not own_queue
        with self._pending_lock:
            if self.closing.is_set():
                raise StudioBusy(SHUTTING_DOWN)
            if counted and self._waiting >= self.settings.queue_size:
                waiting = "1 request is" if self._waiting == 1 else f"{self._waiting} requests are"
                raise StudioBusy(f"busy: {waiting} waiting for the device; try again in a moment")
            self._pending += 1
            self._waiting += counted
            self._cancels.add(cancel)

        def started() -> None:
            nonlocal counted
            with self._pending_lock:
                self._waiting -= counted
                counted = False

        try:
            generation = self.engine.generate(request, on_step, cancel, started)
            entries = self._save_whole(generation, cancel)
        except GenerationCancelled:
            if self.closing.is_set():
                raise StudioBusy(SHUTTING_DOWN) from None
            raise
        finally:
            started()  # a request that never ran stops waiting too
            with self._pending_lock:
                self._pending -= 1
                self._cancels.discard(cancel)
        return StudioResult(generation, entries)

    def _save_whole(self, generation: Generation, cancel: threading.Event) -> list[GalleryEntry]:
        """The generation's pictures in the gallery, all of them or none: a disk that fills up, Ctrl-C or a cancel
        (also one that came while decoding) between two pictures of a batch takes the ones saved before it away
        again."""
        entries: list[GalleryEntry] = []
        try:
            for image, seed in zip(generation.images, generation.seeds, strict=True):
                if cancel.is_set():
                    raise GenerationCancelled
                entries.append(self.gallery.save(image, image_meta(generation.request, seed, generation.scheduler)))
            if cancel.is_set():
                raise GenerationCancelled
        except BaseException:
            self._take_back(entries)
            raise
        return entries

    def discard(self, result: StudioResult) -> None:
        """Take a result's pictures back out of the gallery: its caller went away just as they were saved."""
        self._take_back(result.entries)

    def _take_back(self, entries: list[GalleryEntry]) -> None:
        for entry in entries:
            try:
                self.gallery.delete(entry.file_name)
            except Exception:  # the first failure is the one to report; take back what can be taken back
                log.exception("could not take %s back out of the gallery", entry.file_name)

    def shut_down(self) -> None:
        """Refuse new requests and cancel the running and waiting ones: each stops within a step, saves nothing, and
        its caller hears that the server is shutting down. Compilations in the background stop too."""
        with self._pending_lock:
            self.closing.set()
            for cancel in self._cancels:
                cancel.set()
        stop_compiling()

    @property
    def pending(self) -> int:
        """Requests running or waiting for the device."""
        return self._pending

    def models(self) -> list[dict[str, Any]]:
        loaded = set(self.engine.loaded_ids())
        rows = []
        for spec in self.registry:
            weights, available = self.engine.model_state(spec)
            rows.append(
                {
                    "id": spec.id,
                    "name": spec.name,
                    "family": spec.family,
                    "width": spec.width,
                    "height": spec.height,
                    "steps": spec.steps,
                    "guidance_scale": spec.guidance_scale,
                    "loaded": spec.id in loaded,
                    "available": available,
                    "weights": weights,
                }
            )
        return rows

    def status(self) -> dict[str, Any]:
        gpu = None
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            gpu = {"name": torch.cuda.get_device_name(), "memory_total": total, "memory_free": free}
        device = self.engine.cache.device.type if isinstance(self.engine, LocalEngine) else "remote"
        return {
            "device": device,
            "gpu": gpu,
            "versions": {
                "dreamsketch": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "gradio": version("gradio"),
            },
            "loaded_models": self.engine.loaded_ids(),
            "compiling_models": self.engine.compiling_ids(),
            "queue_length": self.pending,
            "default_model": self.default_model,
        }


def image_meta(request: GenerationRequest, seed: int, scheduler: str) -> ImageMeta:
    return ImageMeta(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model_id=request.model_id,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=seed,
        scheduler=scheduler,
        strength=request.strength,
    )
