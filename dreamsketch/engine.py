"""Generation: run a validated request through a cached pipeline, with progress, preview and cancel."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamsketch.config import Settings
from dreamsketch.pipelines import LoadedModel, PipelineCache, free_memory
from dreamsketch.registry import Registry
from dreamsketch.request import GenerationRequest
from dreamsketch.schedulers import make_scheduler, scheduler_name

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


@dataclass
class Generation:
    request: GenerationRequest  # with the seed actually used
    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    warnings: list[str] = field(default_factory=list)


class LocalEngine:
    """Pipelines on this machine: one generation per device at a time, any number of callers."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.cache = PipelineCache(settings, registry)
        self.lock = threading.Lock()

    def preload(self, model_id: str) -> None:
        with self.lock:
            self.cache.get(model_id)

    def loaded_ids(self) -> list[str]:
        return list(self.cache.loaded)

    def generate(
        self, request: GenerationRequest, on_step: StepCallback | None = None, cancel: threading.Event | None = None
    ) -> Generation:
        request = request.with_seed()
        with self.lock:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled
            model = self.cache.get(request.model_id)
            try:
                return self._run(model, request, on_step, cancel)
            except torch.cuda.OutOfMemoryError:
                free_memory()
                raise GenerationError(
                    f"Out of GPU memory at {request.width}x{request.height}, batch {request.batch_size}: "
                    "lower the size or the batch size and try again."
                ) from None

    def _run(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        on_step: StepCallback | None,
        cancel: threading.Event | None,
    ) -> Generation:
        spec = model.spec
        pipe = model.txt2img if request.image is None else model.img2img
        name = request.scheduler or spec.scheduler
        if name is None:
            pipe.scheduler = type(model.txt2img.scheduler).from_config(model.default_scheduler_config)
            name = scheduler_name(pipe.scheduler)
        else:
            pipe.scheduler = make_scheduler(name, model.default_scheduler_config)
        seeds = request.image_seeds()

        def callback(pipeline, step_index, timestep, tensors):  # type: ignore[no-untyped-def]
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled
            if on_step is not None:
                on_step(Step(step_index + 1, pipeline.num_timesteps, tensors["latents"], spec.family))
            return {}

        kwargs: dict[str, Any] = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.batch_size,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="latent",
            callback_on_step_end=callback,
        )
        if request.image is None:
            kwargs.update(width=request.width, height=request.height)
        else:
            kwargs.update(
                image=request.image.resize((request.width, request.height), Image.Resampling.LANCZOS),
                strength=request.strength,
            )
        with torch.inference_mode():
            latents = pipe(**kwargs).images
            images = decode(pipe, latents, tiled=request.width * request.height > spec.native_area)
        return Generation(request, images, seeds, name, prompt_warnings(pipe, request))


def decode(pipe, latents: torch.Tensor, tiled: bool) -> list[Image.Image]:  # type: ignore[no-untyped-def]
    """Latents to pictures. A NaN or all-black result from a half-precision VAE is decoded again in fp32."""
    vae = pipe.vae
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    scaled = latents / vae.config.scaling_factor
    upcast_first = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    pixels = None if upcast_first else vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    if pixels is None or (vae.dtype != torch.float32 and _is_broken(pixels)):
        if pixels is not None:
            log.warning("the %s VAE gave NaN or black pixels; decoding again in fp32", vae.dtype)
        original = vae.dtype
        vae.to(torch.float32)
        try:
            pixels = vae.decode(scaled.float(), return_dict=False)[0]
        finally:
            vae.to(original)
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def _is_broken(pixels: torch.Tensor) -> bool:
    return bool(torch.isnan(pixels).any()) or bool((pixels <= -1).all())


def prompt_warnings(pipe, request: GenerationRequest) -> list[str]:  # type: ignore[no-untyped-def]
    """Say which words the text encoder will not read (it reads 77 tokens, the first and last are markers)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    warnings = []
    for field_name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        ids = tokenizer(text, truncation=False, add_special_tokens=True).input_ids
        if len(ids) > limit:
            dropped = tokenizer.decode(ids[limit - 1 : -1]).strip()
            warnings.append(
                f"{field_name} is {len(ids) - 2} tokens; the text encoder reads {limit - 2}, "
                f"so this part is ignored: {dropped!r}"
            )
    return warnings
