"""USE_LOCAL_MODELS=false: generation through the Hugging Face Inference API instead of local pipelines."""

from __future__ import annotations

import io
import threading
from typing import Any

from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from dreamsketch.config import Settings
from dreamsketch.engine import Generation, GenerationCancelled, GenerationError, Step, StepCallback
from dreamsketch.registry import Registry
from dreamsketch.request import GenerationRequest
from dreamsketch.schedulers import DEFAULT_SCHEDULER


class RemoteEngine:
    """Same interface as LocalEngine. One API call per image; progress is reported per image."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.registry = registry
        self.base_url = settings.inference_api_url
        if self.base_url:
            self.client = InferenceClient(base_url=self.base_url, token=settings.hf_token, timeout=300)
        else:
            self.client = InferenceClient(provider="hf-inference", token=settings.hf_token, timeout=300)

    def preload(self, model_id: str) -> None:
        self.registry.get(model_id)

    def loaded_ids(self) -> list[str]:
        return []

    def generate(
        self, request: GenerationRequest, on_step: StepCallback | None = None, cancel: threading.Event | None = None
    ) -> Generation:
        request = request.with_seed()
        spec = self.registry.get(request.model_id)
        model = None if self.base_url else spec.source
        seeds = request.image_seeds()
        images = []
        for index, seed in enumerate(seeds):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled
            try:
                images.append(self._one(request, seed, model))
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else "no answer"
                raise GenerationError(f"the Inference API refused model '{spec.id}' ({status})") from None
            except OSError as exc:
                raise GenerationError(f"the Inference API could not be reached ({exc.__class__.__name__})") from None
            if on_step is not None:
                on_step(Step(index + 1, len(seeds), None, spec.family))
        return Generation(request, images, seeds, request.scheduler or DEFAULT_SCHEDULER)

    def _one(self, request: GenerationRequest, seed: int, model: str | None) -> Image.Image:
        common: dict[str, Any] = dict(
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            model=model,
        )
        if request.image is None:
            image = self.client.text_to_image(
                request.prompt, height=request.height, width=request.width, seed=seed, **common
            )
        else:
            buffer = io.BytesIO()
            request.image.save(buffer, format="PNG")
            image = self.client.image_to_image(
                buffer.getvalue(), request.prompt, strength=request.strength, seed=seed, **common
            )
        return image.convert("RGB")
