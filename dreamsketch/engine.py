"""Generation: run a validated request through a cached pipeline, with progress, preview and cancel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamsketch.config import Settings
from dreamsketch.fastpath import compiling, out_of_memory, wait_for_compilation
from dreamsketch.pipelines import USABLE_NOW, LoadedModel, PipelineCache, weights_state
from dreamsketch.registry import ModelSpec, Registry
from dreamsketch.request import GenerationRequest
from dreamsketch.schedulers import prepare_for_call, scheduler_name

log = logging.getLogger(__name__)

# Latent channels -> RGB, for a live preview without a second model (rows: latent channels; columns: R, G, B).
PREVIEW_MATRICES = {
    "sd15": [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    "sdxl": [
        [0.3448, 0.4168, 0.4395],
        [-0.1953, -0.0290, 0.0250],
        [0.1074, 0.0886, -0.0163],
        [-0.3730, -0.2499, -0.2088],
    ],
}
PREVIEW_MATRICES["sd2"] = PREVIEW_MATRICES["sd15"]


class GenerationCancelled(Exception):
    """The caller cancelled; no image was made."""


class GenerationError(RuntimeError):
    """Generation failed for a reason the user can act on (the message says how)."""


def latent_preview(latents: torch.Tensor, family: str) -> Image.Image:
    """A cheap RGB picture of the first latent of a batch (1/8 of the final size)."""
    matrix = torch.tensor(PREVIEW_MATRICES[family], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), matrix).clamp(-1, 1)
    pixels = ((rgb + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


@dataclass
class Step:
    """Progress after a denoising step: `step` of `total` done."""

    step: int
    total: int
    latents: torch.Tensor | None  # None where the work is remote
    family: str

    def preview(self) -> Image.Image | None:
        return None if self.latents is None else latent_preview(self.latents, self.family)


StepCallback = Callable[[Step], None]


class OneStepAhead:
    """Keeps the host one denoising step ahead of a CUDA device, no further: the device computes a step while the
    host queues the next, and progress and cancellation follow the device to within a step. Unpaced, the host
    would queue every step at once wherever nothing makes it wait for the device, report them all done, and
    a cancel would come too late to stop any of them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.queued: torch.cuda.Event | None = None

    def step_queued(self) -> None:
        """After a step is queued: wait until the step before it has finished on the device."""
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record()
        if self.queued is not None:
            self.queued.synchronize()
        self.queued = event


@dataclass
class Generation:
    request: GenerationRequest  # with the seed actually used
    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    warnings: list[str] = field(default_factory=list)


# A preview copies the latents to the CPU (a GPU sync) and is encoded for the page; a fast GPU makes 100 steps a second.
PREVIEW_INTERVAL_S = 0.1
MAX_BATCH_IMAGES = 8  # concurrent requests are merged into one pipeline call up to this many images
# A request that finds no other waiting waits this long for company: requests sent at the same moment arrive a
# millisecond or so apart, and would otherwise run as one alone and then the rest together.
BATCH_WINDOW_S = 0.002
CANCEL_POLL_S = 0.1  # how often a request waiting for the device looks whether its caller has cancelled


@dataclass(eq=False)
class _Job:
    """One caller's request while it waits for, or runs on, the device."""

    request: GenerationRequest
    on_step: StepCallback | None
    cancel: threading.Event | None
    on_start: Callable[[], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def finish(self, result: Generation | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def outcome(self) -> Generation:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def batch_key(request: GenerationRequest) -> tuple[Any, ...]:
    """Requests with equal keys can share one pipeline call."""
    return (
        request.model_id,
        request.mode,
        request.width,
        request.height,
        request.steps,
        request.guidance_scale,
        request.scheduler,
        request.strength,
        not request.negative_prompt,  # decides how the unconditional branch is encoded (see _run)
    )


class LocalEngine:
    """Pipelines on this machine: one pipeline call per device at a time, any number of callers.

    Callers take the device in the order they came. Whoever is next runs its own request together with every
    waiting request of the same batch_key (up to MAX_BATCH_IMAGES images), and hands each its own images."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.cache = PipelineCache(settings, registry)
        self.lock = threading.Lock()  # the device
        self._waiting: list[_Job] = []  # oldest first
        self._turn = threading.Condition()  # guards _waiting; notified when it changes or a batch ends

    def preload(self, model_id: str, compiled: bool = False) -> bool:
        """Load the model now; `compiled`: also wait until the fast path has compiled it in the background (its
        compile cache then serves the next start). Whether it is as asked: False if that compilation failed."""
        with self.lock:
            model = self.cache.get(model_id)
        return not compiled or wait_for_compilation(model.txt2img)

    def loaded_ids(self) -> list[str]:
        return list(self.cache.loaded)

    def compiling_ids(self) -> list[str]:
        """The loaded models whose fast path is still compiling (their requests run uncompiled meanwhile)."""
        return [model_id for model_id, model in self.cache.loaded.items() if compiling(model.txt2img)]

    def model_state(self, spec: ModelSpec) -> tuple[str, bool]:
        """Where the model's weights stand, in the words the browser and the CLI show, and whether it can run now."""
        state = weights_state(spec)  # looks at the disk (and the Hub)
        return state, state in USABLE_NOW

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Generation:
        """on_start is called when the request stops waiting and its batch is about to run."""
        job = _Job(request.with_seed(), on_step, cancel, on_start)
        with self._turn:
            self._waiting.append(job)
        while not job.done.is_set():
            if job.cancelled:
                self._withdraw(job)
            elif self._device_for(job):
                self._run_turn(job)
        return job.outcome()

    def run_alone(self, request: GenerationRequest, on_step: StepCallback | None = None) -> Generation:
        """Run `request` on the device now, taking none of the engine's locks: for a ZeroGPU worker, whose fork
        copied them in whatever state they were (the main process takes turns for it)."""
        job = _Job(request, on_step, None, None)
        self._run_batch([job])
        return job.outcome()

    def _device_for(self, job: _Job) -> bool:
        """Wait at most CANCEL_POLL_S for `job`'s turn: True, holding the device, once it is the oldest request
        waiting and the device is free."""
        with self._turn:
            if not self._waiting or self._waiting[0] is not job:
                self._turn.wait(CANCEL_POLL_S)
                return False
        return self.lock.acquire(timeout=CANCEL_POLL_S)

    def _run_turn(self, leader: _Job) -> None:
        """With the device held: run the batch `leader` heads. Whatever happens, every request taken from the waiting
        list is finished, the device is released and the waiting are woken."""
        batch: list[_Job] = []
        try:
            batch = self._take_batch(leader)
            for job in batch:
                if job.on_start is not None:
                    job.on_start()
            self._run_batch(batch)
        except BaseException as exc:
            for job in batch:
                if not job.done.is_set():
                    job.finish(error=exc)
            raise
        finally:
            self.lock.release()
            with self._turn:
                self._turn.notify_all()

    def _withdraw(self, job: _Job) -> None:
        """A cancelled request still waiting for the device leaves now, not when the running batch ends (until then
        it counted as waiting, and could turn others away as busy). One taken into the running batch stops at its
        next step."""
        with self._turn:
            if job in self._waiting:
                self._waiting.remove(job)
                job.finish(error=GenerationCancelled())
                self._turn.notify_all()
            elif not job.done.is_set():
                self._turn.wait(CANCEL_POLL_S)

    def _take_batch(self, leader: _Job) -> list[_Job]:
        with self._turn:
            alone = self._waiting == [leader]
        if alone:
            time.sleep(BATCH_WINDOW_S)
        key = batch_key(leader.request)
        batch, images = [], 0
        with self._turn:
            for job in list(self._waiting):
                if job.cancelled:
                    self._waiting.remove(job)
                    job.finish(error=GenerationCancelled())
                elif batch_key(job.request) == key and images + job.request.batch_size <= MAX_BATCH_IMAGES:
                    self._waiting.remove(job)
                    batch.append(job)
                    images += job.request.batch_size
            self._turn.notify_all()  # the next in line can wait for the device now
        return batch

    def _run_batch(self, jobs: list[_Job], again: bool = True) -> None:
        """Run `jobs` as one pipeline call. Out of GPU memory, merged requests run again one by one, and a request
        alone runs again once if CUDA graphs held memory (`again`)."""
        if not jobs:
            return
        request = jobs[0].request
        try:
            self._run(self.cache.get(request.model_id), jobs)
            return
        except GenerationCancelled:
            for job in jobs:
                if not job.done.is_set():
                    job.finish(error=GenerationCancelled())
            return
        except Exception as exc:
            if not out_of_memory(exc):
                for job in jobs:
                    if not job.done.is_set():
                        job.finish(error=exc)
                return
        # out of memory: handled here, once the error no longer holds the failed call's tensors
        dropped_graphs = self.cache.free_memory()
        if len(jobs) > 1:  # merged here, not asked for together: each request alone may fit
            for job in jobs:
                if not job.done.is_set():
                    self._run_batch([job], again=False)
        elif again and dropped_graphs:
            self._run_batch(jobs, again=False)
        else:
            jobs[0].finish(error=GenerationError(out_of_memory_message(request)))

    def _run(self, model: LoadedModel, jobs: list[_Job]) -> None:
        first = jobs[0].request
        spec = model.spec
        pipe = model.txt2img if first.image is None else model.img2img
        chosen = first.scheduler or spec.scheduler
        pipe.scheduler = model.fresh_scheduler(chosen)
        name = chosen or scheduler_name(model.default_scheduler)
        seeds = [seed for job in jobs for seed in job.request.image_seeds()]
        prepare_for_call(pipe.scheduler, seeds)
        spans, start = [], 0
        for job in jobs:
            spans.append(slice(start, start + job.request.batch_size))
            start += job.request.batch_size

        pace = OneStepAhead(pipe.device)
        total = first.denoising_steps

        def callback(pipeline, step_index, timestep, tensors):  # type: ignore[no-untyped-def]
            pace.step_queued()
            # The request's steps finished: Heun and DPM++ SDE evaluate the UNet twice a step but the last, PNDM once
            # more in all
            done = min(total, (step_index + 1) * total // pipeline.num_timesteps)
            for job, span in zip(jobs, spans, strict=True):
                if job.done.is_set():
                    continue
                if job.cancelled:
                    job.finish(error=GenerationCancelled())
                elif job.on_step is not None:
                    step = Step(done, total, tensors["latents"][span], spec.family)
                    try:
                        job.on_step(step)
                    except Exception as exc:  # one caller's broken callback fails that caller only
                        job.finish(error=exc)
            if all(job.done.is_set() for job in jobs):
                raise GenerationCancelled
            return {}

        # No negative prompt is passed as None, not "": SDXL then conditions its unconditional branch on zeros
        # (force_zeros_for_empty_prompt), as it was trained; SD 1.x/2.x encode "" either way.
        negative = [job.request.negative_prompt for job in jobs for _ in range(job.request.batch_size)]
        kwargs: dict[str, Any] = dict(
            prompt=[job.request.prompt for job in jobs for _ in range(job.request.batch_size)],
            negative_prompt=negative if first.negative_prompt else None,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="latent",
            callback_on_step_end=callback,
        )
        if first.image is None:
            kwargs.update(width=first.width, height=first.height)
        else:
            sources = [job.request.image for job in jobs for _ in range(job.request.batch_size)]
            kwargs.update(image=sources, strength=first.strength)
        with torch.inference_mode():
            latents = pipe(**kwargs).images
            images = decode(pipe, latents, tiled=first.width * first.height > spec.native_area)
        for job, span in zip(jobs, spans, strict=True):
            if not job.done.is_set():
                warnings = prompt_warnings(pipe, job.request)
                job.finish(Generation(job.request, images[span], job.request.image_seeds(), name, warnings))


def out_of_memory_message(request: GenerationRequest) -> str:
    size = f"{request.width}x{request.height}"
    if request.batch_size == 1:
        return f"Out of GPU memory at {size}: lower the size."
    return f"Out of GPU memory at {size}, batch size {request.batch_size}: lower the size or the batch size."


def decode(pipe, latents: torch.Tensor, tiled: bool) -> list[Image.Image]:  # type: ignore[no-untyped-def]
    """Latents to pictures; out of GPU memory for a batch, one picture at a time (decoding a batch at once takes
    about 1 GB per 512x512 picture in fp32, 4 GB per SDXL picture at 1024x1024)."""
    vae = pipe.vae
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    scaled = latents / vae.config.scaling_factor
    dtype = vae.dtype
    try:
        return to_pictures(decode_pixels(vae, scaled))
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
    # out of memory: handled here, once the error no longer holds the failed decode's tensors
    vae.to(dtype)  # out of memory while converting it to fp32 or back, the VAE may have been left half converted
    if len(scaled) == 1:
        raise torch.cuda.OutOfMemoryError("out of GPU memory decoding the picture")
    log.warning("out of GPU memory decoding %d pictures at once; decoding them one at a time", len(scaled))
    return [picture for one in scaled.split(1) for picture in to_pictures(decode_pixels(vae, one))]


def decode_pixels(vae, scaled: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The VAE's pixels. A NaN or all-black result from a half-precision VAE is decoded again in fp32."""
    upcast_first = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    pixels = None if upcast_first else vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    if pixels is None or (vae.dtype != torch.float32 and _is_broken(pixels)):
        if pixels is not None:
            log.warning("the %s VAE gave NaN or black pixels; decoding again in fp32", vae.dtype)
        original = vae.dtype
        try:
            vae.to(torch.float32)
            pixels = vae.decode(scaled.float(), return_dict=False)[0]
        finally:
            vae.to(original)
    return pixels


def to_pictures(pixels: torch.Tensor) -> list[Image.Image]:
    """The VAE's output (-1..1) as 8-bit pictures, rounded as diffusers' VaeImageProcessor does, but on the
    pixels' device: a quarter of the bytes cross to the host and the host does no arithmetic."""
    levels = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(array) for array in levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()]


def _is_broken(pixels: torch.Tensor) -> bool:
    return bool(torch.isnan(pixels).any()) or bool((pixels <= -1).all())


def prompt_warnings(pipe, request: GenerationRequest) -> list[str]:  # type: ignore[no-untyped-def]
    """Say which words the text encoder will not read (it reads 77 tokens, the first and last are markers)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    warnings = []
    for field_name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        tokens = tokenizer(text, truncation=False, add_special_tokens=False, return_offsets_mapping=True)
        if len(tokens.input_ids) > limit - 2:
            dropped = text[tokens.offset_mapping[limit - 2][0] :].strip()  # as written, not as tokens decode
            warnings.append(
                f"{field_name} is {len(tokens.input_ids)} tokens; the text encoder reads {limit - 2}, "
                f"so this part is ignored: {dropped!r}"
            )
    return warnings
