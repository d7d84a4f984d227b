"""USE_LOCAL_MODELS=false: generation through the Hugging Face Inference API instead of local pipelines."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from dreamsketch.config import Settings
from dreamsketch.engine import Generation, GenerationCancelled, GenerationError, Step, StepCallback
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import ModelSpec, Registry
from dreamsketch.request import GenerationRequest, RequestError
from dreamsketch.schedulers import SCHEDULERS

try:  # huggingface_hub 2 sends its requests with httpx2, 1.x with httpx
    from httpx2 import HTTPError as TransportError
except ImportError:
    from httpx import HTTPError as TransportError  # type: ignore[assignment]

# The Inference API swaps in a scheduler by its diffusers class name, built on the model's own config, and only for
# txt2img: so only the names that are a plain class (no Karras sigmas, no PNDM variant) can be asked for.
REMOTE_SCHEDULERS = {name: class_name for name, (class_name, extra) in SCHEDULERS.items() if not extra}
SERVICE_SCHEDULER = ""  # recorded when the service picks the scheduler: it does not say which


class InferenceApiError(GenerationError):
    """The Inference API failed or answered wrongly: the HTTP API replies 502 (a gateway's upstream failed)."""


class RemoteEngine:
    """Same interface as LocalEngine. One API call per image; progress is reported per image."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.registry = registry
        self.base_url = settings.inference_api_url
        if self.base_url:
            self.client = InferenceClient(base_url=self.base_url, token=settings.hf_token, timeout=300)
        else:
            self.client = InferenceClient(provider="hf-inference", token=settings.hf_token, timeout=300)

    def preload(self, model_id: str, compiled: bool = False) -> bool:  # nothing compiles here
        self._model(self.registry.get(model_id))
        return True

    def loaded_ids(self) -> list[str]:
        return []

    def compiling_ids(self) -> list[str]:
        return []

    def model_state(self, spec: ModelSpec) -> tuple[str, bool]:
        """What the service can run, in the words the browser and the CLI show, and whether it can run it."""
        if self.base_url:
            return "on your endpoint", True
        if spec.source_kind == "hub":
            return "on the Inference API", True
        return "local only (USE_LOCAL_MODELS=true)", False

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Generation:
        """on_start is never called: a request waits for the service until it is answered."""
        request = request.with_seed()
        spec = self.registry.get(request.model_id)
        model = self._model(spec)
        scheduler = remote_scheduler(request, spec)
        seeds = request.image_seeds()
        images = []
        for index, seed in enumerate(seeds):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled
            images.append(self._one(request, spec, seed, model, scheduler))
            if on_step is not None:
                on_step(Step(index + 1, len(seeds), None, spec.family))
        return Generation(request, images, seeds, scheduler or SERVICE_SCHEDULER)

    def _model(self, spec: ModelSpec) -> str | None:
        """The Hub repo the Inference API is asked to run; None for an endpoint of one's own (it serves one model)."""
        if self.base_url:
            return None
        if spec.source_kind != "hub":
            raise ModelUnavailableError(
                f"model '{spec.id}' is a local model and cannot run on the Inference API; "
                "set USE_LOCAL_MODELS=true or pick a Hub model"
            )
        return spec.source

    def _one(
        self, request: GenerationRequest, spec: ModelSpec, seed: int, model: str | None, scheduler: str | None
    ) -> Image.Image:
        try:
            image = self._ask(request, seed, model, scheduler)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "no answer"
            advice = "; set HF_TOKEN to a token that may use it" if status in (401, 403) else ""
            raise InferenceApiError(f"the Inference API refused model '{spec.id}' ({status}){advice}") from None
        except (OSError, TransportError) as exc:
            raise InferenceApiError(f"the Inference API could not be reached ({exc.__class__.__name__})") from None
        except ValueError as exc:  # huggingface_hub's own refusal, e.g. a model whose Hub task is text-to-image only
            raise InferenceApiError(f"the Inference API cannot run model '{spec.id}': {exc}") from None
        width, height = image.size
        if (width, height) != (request.width, request.height):
            raise InferenceApiError(
                f"the Inference API returned a {width}x{height} picture for a {request.width}x{request.height} request"
            )
        return image

    def _ask(self, request: GenerationRequest, seed: int, model: str | None, scheduler: str | None) -> Image.Image:
        common: dict[str, Any] = dict(
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            model=model,
        )
        if request.image is None:
            image = self.client.text_to_image(
                request.prompt,
                height=request.height,
                width=request.width,
                seed=seed,
                scheduler=None if scheduler is None else REMOTE_SCHEDULERS[scheduler],
                **common,
            )
        else:
            buffer = io.BytesIO()
            request.image.save(buffer, format="PNG")
            image = self.client.image_to_image(
                buffer.getvalue(), request.prompt, strength=request.strength, seed=seed, **common
            )
        return image.convert("RGB")


def remote_scheduler(request: GenerationRequest, spec: ModelSpec) -> str | None:
    """The A1111 name to ask the Inference API for: the request's, else the registry's where the service takes it;
    None leaves the choice to the service."""
    if request.scheduler is None:
        return spec.scheduler if request.image is None and spec.scheduler in REMOTE_SCHEDULERS else None
    if request.image is not None:
        raise RequestError("scheduler", "the Inference API takes none for img2img (leave it Default)")
    if request.scheduler not in REMOTE_SCHEDULERS:
        raise RequestError("scheduler", f"the Inference API takes only {', '.join(REMOTE_SCHEDULERS)} (or Default)")
    return request.scheduler
