"""The Gradio Blocks app: wires events to the Studio (validation: studio.parse; generation: studio.generate).

Two kinds of generation events share one queue ("gpu", GPU_CONCURRENCY in flight, merged into batches by the
engine):
- the stable API endpoints `/txt2img` and `/img2img` (gradio_client, MCP), whose parameter names are fixed;
- the browser's Generate buttons, which stream a live preview (private, not in the API).
Both run studio.generate in a worker thread; steps come back through an asyncio queue to report progress, and a
cancelled Gradio task sets the threading.Event that the engine checks after every step.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import html
import logging
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from dreamsketch.api import origin
from dreamsketch.engine import MAX_BATCH_IMAGES, PREVIEW_INTERVAL_S, GenerationCancelled, GenerationError, Step
from dreamsketch.gallery import GalleryEntry, GalleryError, format_parameters, parse_parameters, read_parameters
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.request import (
    DEFAULT_STRENGTH,
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    GenerationRequest,
    Mode,
    RequestError,
    decode_image,
)
from dreamsketch.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from dreamsketch.studio import Studio, StudioBusy, StudioResult
from dreamsketch.zerogpu import on_zero_gpu

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"
# Generations in flight at once. The engine runs one pipeline call at a time and merges the compatible requests
# waiting for it, so several in flight let people share a batch. ZeroGPU leases a GPU to each call: one there.
GPU_CONCURRENCY = 1 if on_zero_gpu() else MAX_BATCH_IMAGES
GALLERY_PAGE = 24
LAST_PAGE = 2**31  # the Gallery tab's "Oldest": past the last page, which gallery_page clamps to
WARNING_TOAST_CHARS = 300
UPLOADS_KEPT = (3600, 86400)  # Gradio's copies of uploads and previews: looked at hourly, deleted after a day
PRIVATE: dict[str, Any] = {"api_visibility": "private"}
# Failures whose own message is what the user needs (GalleryError: disk full, read-only)
USER_ERRORS = (RequestError, ModelUnavailableError, GenerationError, StudioBusy, GalleryError)
SUGGESTED_PROMPTS = [
    "a lighthouse on a cliff at sunset, dramatic clouds, oil painting",
    "a cozy reading nook with a cat, warm light, watercolor",
    "isometric city block at night, neon signs, rain, detailed",
    "portrait of an astronaut in a sunflower field, 35mm photo",
    "a red fox in fresh snow, morning mist, wildlife photography",
]
THEME = gr.themes.Soft(primary_hue="violet", secondary_hue="indigo")
# Narrow screens: the Gallery tab's grid wraps instead of cutting its fourth column off, and the models table
# scrolls sideways instead of breaking its words a letter a line.
CSS = """
.ds-preview img { image-rendering: pixelated; }
.ds-header { margin-bottom: 0; }
@media (max-width: 900px) {
  #gallery-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); }
  #models-table { overflow-x: auto; }
  #models-table .table-container { min-width: 760px; }
}
"""
# The restored fields checked as a txt2img request would check them, one at a time but the size as a pair (strength
# comes from img2img pictures, whose A1111 "Denoising strength" is always within its bounds).
RESTORE_CHECKED = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed")
LABELS = {  # the form's names for request fields
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "width": "Width",
    "height": "Height",
    "steps": "Steps",
    "guidance_scale": "Guidance",
    "seed": "Seed",
    "batch_size": "Batch size",
}
SIZE = ("width", "height")
FORM_FIELDS = ("prompt", "negative_prompt", "model_id", "width", "height", "steps", "guidance_scale", "seed")


def image_upload(**kwargs: Any) -> gr.Image:
    """An image input (type="filepath") whose uploads reach our own checks as they were sent: a data URL (sent to
    Gradio's /call route) as it is, where Gradio would decode it and save it again as WebP whatever it was, and a
    file Gradio cannot convert as its path, where Gradio's conversion error shows the server's paths. (A gr.Image
    subclass would make Gradio write a .pyi stub next to this module.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    convert = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and is_data_url(payload.url):
            return payload.url
        try:
            return convert(payload)
        except Exception:  # whatever PIL makes of a bad file, request validation refuses it with a clear message
            return payload.path

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip()[:5].lower() == "data:"


def text_input(value: str, label: str) -> gr.Textbox:
    """A text input whose values reach our own checks as they were sent: Gradio's Textbox would make "5" of 5."""
    component = gr.Textbox(value, label=label)
    convert = component.preprocess

    def preprocess(payload: Any) -> Any:
        return convert(payload) if isinstance(payload, str) else payload

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


# ---------------------------------------------------------------------------------------------------------------
# Running a generation off the event loop


@dataclass
class Progressed:
    step: int
    total: int
    preview: Image.Image | None


@dataclass
class _Done:
    outcome: StudioResult | BaseException


Generate = Callable[..., StudioResult]


async def run_generation(
    generate: Generate, request: Any, previews: bool, discard: Callable[[StudioResult], None]
) -> AsyncIterator[Progressed | StudioResult]:
    """Yield Progressed items (coalesced to the latest), then the StudioResult; a cancelled consumer stops the work,
    and a result that comes too late for it is `discard`ed (saved just as the cancel came: nobody will see it).

    With `previews`, the first step has a preview and later steps one at most every PREVIEW_INTERVAL_S."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Progressed | _Done] = asyncio.Queue()
    cancel = threading.Event()
    last_preview = -PREVIEW_INTERVAL_S
    handoff = threading.Lock()  # between the result's arrival and the consumer's end
    unseen: list[StudioResult] = []  # a result put in `items` and not yet taken out
    closed = False

    def put(item: Progressed | _Done) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancel.set()

    def on_step(step: Step) -> None:
        nonlocal last_preview
        preview = None
        if previews and time.monotonic() - last_preview >= PREVIEW_INTERVAL_S:
            preview, last_preview = step.preview(), time.monotonic()
        put(Progressed(step.step, step.total, preview))

    def work() -> None:
        try:
            result = generate(request, on_step=on_step, cancel=cancel)
        except BaseException as exc:  # handed to the consumer, which decides what the user sees
            put(_Done(exc))
            return
        with handoff:
            if not closed:
                unseen.append(result)
                put(_Done(result))
                return
        discard(result)

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name="dreamsketch-generate", daemon=True).start()
    watcher = asyncio.ensure_future(cancel_when_client_gone(cancel))
    try:
        while True:
            item = await items.get()
            while isinstance(item, Progressed) and not items.empty():
                newer = items.get_nowait()
                if isinstance(newer, Progressed) and newer.preview is None:
                    newer.preview = item.preview  # a skipped item's preview is still the newest one
                item = newer
            if isinstance(item, Progressed):
                yield item
                continue
            if isinstance(item.outcome, BaseException):
                raise item.outcome
            with handoff:
                unseen.clear()
            yield item.outcome
            return
    finally:
        watcher.cancel()
        cancel.set()
        with handoff:
            closed = True
        for result in unseen:  # off the event loop: taking back is disk and index work
            threading.Thread(target=discard, args=(result,), name="dreamsketch-discard", daemon=True).start()


CLIENT_CHECK_S = 0.5  # how often a running event looks whether its client is still there


async def cancel_when_client_gone(cancel: threading.Event) -> None:
    """Set `cancel` when Gradio marks this event's client gone (its stream closed: a closed tab, a killed
    gradio_client). Gradio then stops a generator, as the browser's Generate is, but let an API call (/txt2img,
    /img2img) run to the end, holding the device and saving pictures for no one. Reads Gradio 6.31's private queue
    (`Queue.event_ids_to_events`, `Event.alive`): check it when upgrading Gradio (tests/test_faults.py fails
    if it breaks)."""
    from gradio.context import LocalContext

    queue, event_id = getattr(LocalContext.blocks.get(None), "_queue", None), LocalContext.event_id.get(None)
    event = queue.event_ids_to_events.get(event_id) if queue is not None and event_id is not None else None
    if event is None:  # not a queued Gradio event (tests calling handlers directly)
        return
    while event.alive:
        await asyncio.sleep(CLIENT_CHECK_S)
    cancel.set()


def error(message: str) -> gr.Error:
    """A message for the page (Gradio renders it as HTML, so it is escaped), without a server-side traceback."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def user_error(exc: BaseException) -> gr.Error:
    """What the page shows: our own messages for expected failures, a generic one (logged here) otherwise."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, USER_ERRORS):
        return error(str(exc))
    if isinstance(exc, GenerationCancelled):
        return error("Cancelled.")
    log.error("generation failed", exc_info=exc)
    return error("Generation failed unexpectedly; the server log has the details.")


# ---------------------------------------------------------------------------------------------------------------
# Values between the Studio and the components


def request_fields(studio: Studio, mode: Mode, values: dict[str, Any]) -> dict[str, Any]:
    """Component values -> studio.parse fields (the image's path or data URL -> its bytes)."""
    fields = {name: values.get(name) for name in (*FORM_FIELDS, "scheduler", "batch_size")}
    if mode == "img2img":
        fields["strength"] = values.get("strength")
        fields["image"] = read_upload(studio, values.get("image"))
    return fields


def read_upload(studio: Studio, path: Any) -> bytes | None:
    """An image Gradio received: a data URL, a file uploaded through Gradio, or a gallery picture (Send to img2img).
    Gradio's own check lets any file in the gallery folder through (a static path): only PNGs named in the index
    are taken."""
    if not path:
        return None
    if is_data_url(path):
        try:
            return decode_image(path)
        except RequestError as exc:
            raise error(str(exc)) from None
    target = Path(path).resolve()
    if not (target.is_relative_to(Path(get_upload_folder()).resolve()) or studio.gallery.holds(target)):
        raise error("field 'image': not an uploaded file; upload the image")
    try:
        return Path(path).read_bytes()
    except OSError:
        raise error("field 'image': the uploaded file could not be read; upload it again") from None


def entry_path(studio: Studio, entry: GalleryEntry) -> str:
    return str(studio.gallery.folder / entry.file_name)


def result_gallery(studio: Studio, result: StudioResult) -> list[tuple[str, str]]:
    return [(entry_path(studio, e), f"seed {e.meta.seed}") for e in result.entries]


def result_info(result: StudioResult) -> dict[str, Any]:
    request = result.generation.request
    parameters: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model_id": request.model_id,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "scheduler": result.generation.scheduler,
        "batch_size": request.batch_size,
    }
    if request.strength is not None:
        parameters["strength"] = request.strength
    return {
        "ids": [e.id for e in result.entries],
        "seeds": [e.meta.seed for e in result.entries],
        "file_names": [e.file_name for e in result.entries],
        "parameters": parameters,
        "warnings": list(result.warnings),
    }


def model_choices(models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Dropdown choices from studio.models(), which looks at each model's files on disk."""

    def state(model: dict[str, Any]) -> str:
        return "loaded" if model["loaded"] else str(model["weights"])

    return [(f"{m['name']} · {state(m)}", m["id"]) for m in models]


def model_defaults(studio: Studio, model_id: str) -> tuple[int, int, int, float]:
    spec = studio.registry.get(model_id)
    return spec.width, spec.height, spec.steps, spec.guidance_scale


def suggestion_samples(studio: Studio, model_id: str) -> list[list[str]]:
    """gr.Dataset samples (one column: the Prompt box): the model's own suggested prompts (registry field
    `prompts`), else the generic ones."""
    return [[prompt] for prompt in studio.registry.get(model_id).prompts or SUGGESTED_PROMPTS]


def form_values(parameters: dict[str, Any], studio: Studio, names: tuple[str, ...], form_model: str) -> list[Any]:
    """Updates for the form fields `names` from request-style parameters; gr.skip() where absent (the scheduler:
    the model's own) or outside the request rules for the model the form will have (`form_model` unless the
    parameters name another that can run here), with a warning naming the field: another tool's picture may
    have Steps: 200, a 64-bit seed or a size too large for the model."""
    model_id = restorable_model(studio, parameters.get("model_id"))
    new_model = studio.registry.get(model_id) if model_id not in (None, form_model) else None
    native = {"width": new_model.width, "height": new_model.height} if new_model else {}  # a size that fits it
    left_out = outside_the_rules(studio, parameters, model_id or form_model, native)
    values: list[Any] = []
    for name in names:
        value = model_id if name == "model_id" else parameters.get(name)
        if name == "scheduler":
            value = restored_scheduler(value)
        if name in left_out:
            value = native.get(name)
        values.append(gr.skip() if value is None else value)
    return values


def restored_scheduler(name: str | None) -> str:
    """A restored sampler as the form's scheduler: itself if DreamSketch has it, else the model's own (Default). A
    diffusers class name is how DreamSketch records a model's own scheduler that has no A1111 name, so it restores
    as Default silently; another tool's sampler that DreamSketch lacks restores so with a warning."""
    if name in SCHEDULERS:
        return str(name)
    if name is not None and not name.endswith("Scheduler"):
        gr.Warning(
            html.escape(f"Scheduler: DreamSketch has no {name!r}; the model's own (Default) instead.", quote=False)
        )
    return DEFAULT_SCHEDULER


def outside_the_rules(studio: Studio, parameters: dict[str, Any], model_id: str, native: dict[str, int]) -> set[str]:
    """The restored fields a request for `model_id` would refuse, each said in a warning: checked one at a time, but
    width and height together (their product has a bound). A refused size becomes `native` where given (the
    restored model's own: the form's size may not fit it either)."""
    given = {name: parameters[name] for name in RESTORE_CHECKED if parameters.get(name) is not None}
    size = {name: value for name, value in given.items() if name in SIZE}
    groups = [size] if size else []
    groups += [{name: value} for name, value in given.items() if name not in SIZE]
    refused: set[str] = set()
    for group in groups:
        try:
            studio.parse({**group, "model_id": model_id}, "txt2img")
        except RequestError as exc:
            names = " and ".join(LABELS[name] for name in group)
            kept = f"{names} left as {'they were' if len(group) > 1 else 'it was'}"
            if native and set(group) <= set(SIZE):
                kept = f"the model's own size ({native['width']}x{native['height']}) instead"
            gr.Warning(html.escape(f"{LABELS.get(exc.field, exc.field)}: {exc.rule}; {kept}.", quote=False))
            refused |= set(group)
    return refused


def restorable_model(studio: Studio, model_id: str | None) -> str | None:
    """The parameters' model if it is registered and can run here; else None (the form keeps its own), said why."""
    if model_id is None:
        return None
    if model_id not in studio.registry:
        gr.Warning(html.escape(f"Model '{model_id}' is not in this registry; the model is unchanged.", quote=False))
        return None
    state, available = studio.engine.model_state(studio.registry.get(model_id))
    if not available:
        gr.Warning(html.escape(f"Model '{model_id}' cannot run now ({state}); the model is unchanged.", quote=False))
        return None
    return model_id


def a1111_to_parameters(parsed: dict[str, Any]) -> dict[str, Any]:
    """parse_parameters() keys -> request field names."""
    names = {"model": "model_id", "cfg_scale": "guidance_scale", "sampler": "scheduler"}
    return {names.get(key, key): value for key, value in parsed.items() if key != "extra"}


# ---------------------------------------------------------------------------------------------------------------
# Event handlers (bound to one Studio)


class Handlers:
    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.generate = functools.partial(studio.generate, own_queue=True)  # Gradio's queue bounds these

    async def parse(self, mode: Mode, values: dict[str, Any]) -> GenerationRequest:
        """The request, checked off the event loop (reading, decoding and resizing a 40-megapixel upload takes about
        a second, which would hold up every other event)."""
        return await asyncio.to_thread(lambda: self.studio.parse(request_fields(self.studio, mode, values), mode))

    async def _run(self, mode: Mode, values: dict[str, Any], progress: gr.Progress) -> tuple[list, dict]:
        try:
            request = await self.parse(mode, values)
            result = None
            async for item in run_generation(self.generate, request, False, self.studio.discard):
                if isinstance(item, Progressed):
                    progress((item.step, item.total), desc="Denoising", unit="steps")
                else:
                    result = item
        except Exception as exc:
            raise user_error(exc) from None
        assert result is not None
        return result_gallery(self.studio, result), result_info(result)

    async def txt2img(
        self,
        prompt: str,
        negative_prompt: str,
        model_id: str,
        width: float | None = None,  # None: the model's own (a default of None keeps it optional in gradio_client)
        height: float | None = None,
        steps: float | None = None,
        guidance_scale: float | None = None,
        seed: float = -1,
        scheduler: str = DEFAULT_SCHEDULER,
        batch_size: float = 1,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio finds the tracker by its default value)
    ) -> tuple[list, dict]:
        """Generate images from a text prompt with a Stable Diffusion model; the images are saved to the gallery.

        Args:
            prompt: What the image should show (at most 2,000 characters; past 77 tokens is reported as a warning).
            negative_prompt: What the image should not show ("" for none).
            model_id: A model id from the registry (see the Models tab or GET /api/models/).
            width: Image width in pixels: a multiple of 8 from 64 to 2048 (default: the model's native width).
            height: Image height in pixels: a multiple of 8 from 64 to 2048 (default: the model's native height).
            steps: Denoising steps, 1 to 150 (default: the model's own).
            guidance_scale: Classifier-free guidance scale, 0 to 30 (default: the model's own).
            seed: Random seed, 0 to 4294967295; -1 picks one (the seed used is returned).
            scheduler: "Default" (the model's own) or one of Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DPM++ SDE Karras, DDIM, UniPC, LMS, Heun, PNDM.
            batch_size: Number of images, 1 to 8 (seeds seed, seed+1, ...).
        Returns:
            The images (captioned with their seeds) and an info dict with their gallery ids, seeds, file names, the parameters used and any warnings.
        """  # noqa: E501
        fields = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            model_id=model_id,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler,
            batch_size=batch_size,
        )
        return await self._run("txt2img", fields, progress)

    async def img2img(
        self,
        image: str | None,
        prompt: str,
        negative_prompt: str,
        model_id: str,
        strength: float = DEFAULT_STRENGTH,
        width: float | None = None,  # None: the model's own (a default of None keeps it optional in gradio_client)
        height: float | None = None,
        steps: float | None = None,
        guidance_scale: float | None = None,
        seed: float = -1,
        scheduler: str = DEFAULT_SCHEDULER,
        batch_size: float = 1,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[list, dict]:
        """Transform an input image following a text prompt; the images are saved to the gallery.

        Args:
            image: The input image (PNG, JPEG or WebP, at most 20 MB and 40 megapixels), resized to width x height. Over MCP: a base64 data URL (data:image/png;base64,...), or an http(s) URL of a public file (not one of this server's own addresses).
            prompt: What the image should show.
            negative_prompt: What the image should not show ("" for none).
            model_id: A model id from the registry.
            strength: How much to change the image: more than 0, at most 1 (0.6 is a good start).
            width: Output width in pixels: a multiple of 8 from 64 to 2048 (default: the model's native width).
            height: Output height in pixels: a multiple of 8 from 64 to 2048 (default: the model's native height).
            steps: Denoising steps, 1 to 150 (img2img runs about steps x strength of them; default: the model's own).
            guidance_scale: Classifier-free guidance scale, 0 to 30 (default: the model's own).
            seed: Random seed, 0 to 4294967295; -1 picks one.
            scheduler: "Default" (the model's own) or an A1111 sampler name such as "Euler a" or "DPM++ 2M Karras".
            batch_size: Number of images, 1 to 8.
        Returns:
            The images (captioned with their seeds) and an info dict with their gallery ids, seeds, file names, the parameters used and any warnings.
        """  # noqa: E501
        fields = dict(
            image=image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            model_id=model_id,
            strength=strength,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler,
            batch_size=batch_size,
        )
        return await self._run("img2img", fields, progress)

    async def stream(
        self, mode: Mode, values: dict[str, Any], progress: gr.Progress
    ) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
        """The browser's Generate: live preview every step, then the results, none of them picked yet (for the form's
        preview, results, info and selected)."""
        try:
            request = await self.parse(mode, values)
            progress((0, request.denoising_steps), desc="Waiting for the device", unit="steps")
            async for item in run_generation(self.generate, request, True, self.studio.discard):
                if isinstance(item, Progressed):
                    # Each yield hides Gradio's progress bar until the next progress message: yield only with a
                    # preview, and before the progress, so that the bar shows for the rest of the step.
                    if item.preview is not None:
                        yield item.preview.resize((request.width, request.height)), gr.skip(), gr.skip(), gr.skip()
                    progress((item.step, item.total), desc="Denoising", unit="steps")
                else:
                    for warning in item.warnings:  # the info has it whole; a toast must not cover the page
                        gr.Warning(html.escape(textwrap.shorten(warning, WARNING_TOAST_CHARS), quote=False))
                    first = item.generation.images[0] if item.generation.images else gr.skip()
                    yield first, result_gallery(self.studio, item), result_info(item), 0
        except Exception as exc:
            raise user_error(exc) from None


# ---------------------------------------------------------------------------------------------------------------
# Layout


@dataclass
class Form:
    """One generation tab's components."""

    mode: Mode
    fields: dict[str, Any] = field(default_factory=dict)  # API order
    generate: gr.Button | None = None
    cancel: gr.Button | None = None
    preview: gr.Image | None = None
    results: gr.Gallery | None = None
    info: gr.JSON | None = None
    send: gr.Button | None = None
    reuse: gr.Button | None = None
    selected: gr.State | None = None  # the index of the result picked in `results`
    running: gr.State | None = None  # whether this page's Generate is running (for Cancel's message)
    notice: gr.Markdown | None = None  # "Cancelled; nothing was saved." after a Cancel, until the next Generate
    suggestions: gr.Dataset | None = None  # txt2img only: the chosen model's suggested prompts

    @property
    def restorable_names(self) -> tuple[str, ...]:
        """The fields that "Reuse parameters" sets."""
        strength = ("strength",) if self.mode == "img2img" else ()
        return (*FORM_FIELDS, *strength, "scheduler")

    def restorable(self) -> list[Any]:
        return [self.fields[name] for name in self.restorable_names]


def build_form(studio: Studio, mode: Mode, model_labels: list[tuple[str, str]]) -> Form:
    """`model_labels`: the model dropdown's choices (model_choices)."""
    form = Form(mode)
    width, height, steps, guidance = model_defaults(studio, studio.default_model)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            if mode == "img2img":
                form.fields["image"] = image_upload(
                    label="Input image", sources=["upload", "clipboard"], height=280, elem_id="img2img-image"
                )
            # No max_length: the browser would cut a longer paste silently; the request's check says so instead
            form.fields["prompt"] = gr.Textbox(label=LABELS["prompt"], lines=3, placeholder="Describe the image")
            form.fields["negative_prompt"] = gr.Textbox(label=LABELS["negative_prompt"], lines=2)
            if mode == "txt2img":  # looks like gr.Examples (which is static); wire_form swaps the samples per model
                form.suggestions = gr.Dataset(
                    components=[form.fields["prompt"]],
                    samples=suggestion_samples(studio, studio.default_model),
                    label="Suggested prompts",
                    elem_id="txt2img-suggestions",
                )
            form.fields["model_id"] = gr.Dropdown(model_labels, value=studio.default_model, label="Model")
            if mode == "img2img":
                form.fields["strength"] = gr.Slider(
                    0.01, 1.0, value=DEFAULT_STRENGTH, step=0.01, label="Strength (denoising)"
                )
            with gr.Row():
                form.fields["width"] = gr.Slider(MIN_SIDE, MAX_SIDE, value=width, step=8, label=LABELS["width"])
                form.fields["height"] = gr.Slider(MIN_SIDE, MAX_SIDE, value=height, step=8, label=LABELS["height"])
            with gr.Row():
                form.fields["steps"] = gr.Slider(1, MAX_STEPS, value=steps, step=1, label=LABELS["steps"])
                form.fields["guidance_scale"] = gr.Slider(
                    0, MAX_GUIDANCE, value=guidance, step=0.5, label=LABELS["guidance_scale"]
                )
            with gr.Row():
                form.fields["seed"] = gr.Number(-1, label=f"{LABELS['seed']} (-1: random)")
                form.fields["scheduler"] = gr.Dropdown(
                    [DEFAULT_SCHEDULER, *SCHEDULERS], value=DEFAULT_SCHEDULER, label="Scheduler"
                )
                form.fields["batch_size"] = gr.Slider(1, MAX_BATCH, value=1, step=1, label=LABELS["batch_size"])
            with gr.Row():
                form.generate = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                form.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{mode}-cancel")
            form.notice = gr.Markdown(elem_id=f"{mode}-notice")
        with gr.Column(scale=4, min_width=320):
            form.preview = gr.Image(label="Live preview", interactive=False, height=256, elem_classes="ds-preview")
            form.results = gr.Gallery(
                label="Results",
                columns=2,
                height=360,
                object_fit="contain",
                fit_columns=False,
                interactive=False,
                elem_id=f"{mode}-results",
                type="filepath",
            )
            with gr.Row():
                form.send = gr.Button("Send to img2img", size="sm")
                form.reuse = gr.Button("Reuse parameters", size="sm")
            form.info = gr.JSON(label="Info")
            form.selected = gr.State(0)
            form.running = gr.State(False)
    return form


def api_inputs(studio: Studio, mode: Mode) -> list[Any]:
    """Hidden, unbounded components for the API endpoints: the Studio checks every value and names the field. Size,
    steps and guidance default to None: the chosen model's own, whichever model that is."""
    inputs: list[Any] = []
    if mode == "img2img":
        inputs.append(image_upload(label="image"))
    inputs += [
        text_input("", label="prompt"),
        text_input("", label="negative_prompt"),
        text_input(studio.default_model, label="model_id"),
    ]
    if mode == "img2img":
        inputs.append(gr.Number(DEFAULT_STRENGTH, label="strength"))
    inputs += [
        gr.Number(None, label="width"),
        gr.Number(None, label="height"),
        gr.Number(None, label="steps"),
        gr.Number(None, label="guidance_scale"),
        gr.Number(-1, label="seed"),
        text_input(DEFAULT_SCHEDULER, label="scheduler"),
        gr.Number(1, label="batch_size"),
    ]
    return inputs


def wire_api(studio: Studio, handlers: Handlers) -> None:
    with gr.Group(visible=False):
        for mode, fn in (("txt2img", handlers.txt2img), ("img2img", handlers.img2img)):
            inputs = api_inputs(studio, mode)  # type: ignore[arg-type]
            outputs = [gr.Gallery(label="images", type="filepath"), gr.JSON(label="info")]
            trigger = gr.Button(visible=False)
            trigger.click(
                fn,
                inputs=inputs,
                outputs=outputs,
                api_name=mode,
                concurrency_id=GPU_QUEUE,
                concurrency_limit=GPU_CONCURRENCY,
            )


def wire_form(form: Form, handlers: Handlers, studio: Studio) -> Any:
    """The form's events; returns its Generate event (the caller chains what follows a generation)."""
    assert form.generate and form.cancel and form.results and form.info and form.selected and form.preview
    assert form.running and form.notice
    names = {component: name for name, component in form.fields.items()}
    inputs = set(form.fields.values())
    mode = form.mode

    async def generate(values: dict[Any, Any], progress: gr.Progress = gr.Progress()):  # noqa: B008
        async for update in handlers.stream(mode, {names[c]: v for c, v in values.items()}, progress):
            yield update

    hidden: dict[str, Any] = {"queue": False, "show_progress": "hidden", **PRIVATE}
    started = form.generate.click(lambda: (True, ""), outputs=[form.running, form.notice], **hidden)
    event = started.then(
        generate,
        inputs=inputs,
        outputs=[form.preview, form.results, form.info, form.selected],
        concurrency_id=GPU_QUEUE,
        concurrency_limit=GPU_CONCURRENCY,
        show_progress_on=[form.results],
        **PRIVATE,
    )
    event.then(lambda: False, outputs=form.running, **hidden)

    def cancelled(running: bool) -> tuple[bool, Any]:
        """Say so in the form: not queued (a full queue would refuse it, just when people cancel), so no toast."""
        return False, "Cancelled; nothing was saved." if running else gr.skip()

    outputs = [form.running, form.notice]
    form.cancel.click(cancelled, inputs=form.running, outputs=outputs, cancels=[event], **hidden)
    form.fields["model_id"].input(
        lambda model_id: model_defaults(studio, model_id),
        inputs=form.fields["model_id"],
        outputs=[form.fields[n] for n in ("width", "height", "steps", "guidance_scale")],
        **PRIVATE,
    )
    if form.suggestions is not None:
        # .change, not .input: "Reuse parameters" and the Gallery's restore set the model too, keeping their own size
        # and steps, but the suggestions always belong to the model shown.
        def suggest(model_id: str | None) -> Any:
            if model_id is None or model_id not in studio.registry:  # no model chosen: leave the list as it is
                return gr.skip()
            return gr.Dataset(samples=suggestion_samples(studio, model_id))

        form.fields["model_id"].change(
            suggest,
            inputs=form.fields["model_id"],
            outputs=form.suggestions,
            show_progress="hidden",
            **PRIVATE,
        )
        # The Dataset passes the clicked sample as this session's server-side copy has it, so the current model's.
        form.suggestions.click(
            lambda sample: sample[0],
            inputs=form.suggestions,
            outputs=form.fields["prompt"],
            show_progress="hidden",
            queue=False,
            **PRIVATE,
        )

    def select(evt: gr.SelectData) -> int:
        return int(evt.index)

    form.results.select(select, outputs=form.selected, **PRIVATE)
    return event


NOTHING_GENERATED = "Generate something first."


def leave_as_is(message: str, outputs: int) -> list[Any]:
    """A warning, and every output left as it is: raising gr.Error would cover each output with an error badge."""
    gr.Warning(message)
    return [gr.skip()] * outputs


def picked(items: list[Any], selected: int) -> Any:
    """The item of a result's list (seeds, file names) for the picked result, the first if none is picked."""
    return items[min(max(selected, 0), len(items) - 1)]


def reuse_parameters(
    studio: Studio, info: dict[str, Any], selected: int, names: tuple[str, ...], form_model: str
) -> list[Any]:
    parameters = dict(info["parameters"])
    seeds = info.get("seeds") or []
    if seeds:
        parameters["seed"] = picked(seeds, selected)
    return form_values(parameters, studio, names, form_model)


def wire_transfers(studio: Studio, t2i: Form, i2i: Form, tabs: gr.Tabs) -> None:
    send_outputs = [i2i.fields["image"], *i2i.restorable(), tabs]

    def send(info: dict[str, Any] | None, selected: int, form_model: str) -> list[Any]:
        """The selected result (the first if none) by its gallery file: Gradio would refuse a deleted one's path
        before this runs, with the server's path in its message, if the results were this event's input."""
        if not info or "parameters" not in info:
            return leave_as_is(NOTHING_GENERATED, len(send_outputs))
        path = studio.gallery.folder / picked(info["file_names"], selected)
        if not studio.gallery.holds(path):
            return leave_as_is("This picture is no longer in the gallery.", len(send_outputs))
        parameters = reuse_parameters(studio, info, selected, i2i.restorable_names, form_model)
        return [str(path), *parameters, gr.Tabs(selected="img2img")]

    def reuse_into(names: tuple[str, ...]) -> Callable[[dict[str, Any] | None, int, str], list[Any]]:
        def reuse(info: dict[str, Any] | None, selected: int, form_model: str) -> list[Any]:
            if not info or "parameters" not in info:
                return leave_as_is(NOTHING_GENERATED, len(names))
            return reuse_parameters(studio, info, selected, names, form_model)

        return reuse

    for form in (t2i, i2i):
        assert form.reuse and form.send and form.info and form.selected
        reuse = reuse_into(form.restorable_names)
        inputs = [form.info, form.selected, form.fields["model_id"]]
        form.reuse.click(reuse, inputs=inputs, outputs=form.restorable(), **PRIVATE)
        send_inputs = [form.info, form.selected, i2i.fields["model_id"]]
        form.send.click(send, inputs=send_inputs, outputs=send_outputs, **PRIVATE)


# -- Gallery tab ------------------------------------------------------------------------------------------------


def gallery_page(studio: Studio, page: int) -> tuple[list[tuple[str, str]], list[str], str, int]:
    """Page `page` (0: the newest; clamped, so LAST_PAGE is the oldest): pictures, their file names (ids change
    when a lost index is rebuilt; names do not), the label, the page."""
    total = studio.gallery.count()
    pages = max(1, -(-total // GALLERY_PAGE))
    page = min(max(page, 0), pages - 1)
    entries = studio.gallery.list(limit=GALLERY_PAGE, offset=page * GALLERY_PAGE)
    images = [(entry_path(studio, e), f"#{e.id} · seed {e.meta.seed}") for e in entries]
    label = f"Page {page + 1} of {pages} · {total} image{'s' if total != 1 else ''}"
    return images, [e.file_name for e in entries], label, page


def entry_details(studio: Studio, file_name: str | None) -> tuple[str, dict[str, Any] | None]:
    entry = studio.gallery.find(file_name) if file_name is not None else None
    if entry is None:
        return "", None
    return format_parameters(entry.meta), entry.to_dict()


def build_gallery_tab(studio: Studio, t2i: Form, tabs: gr.Tabs) -> tuple[gr.State, list[Any], Callable[..., Any]]:
    page = gr.State(0)
    names = gr.State([])
    chosen = gr.State(None)
    with gr.Row():
        newest_btn = gr.Button("⏮ Newest", size="sm")
        prev_btn = gr.Button("◀ Newer", size="sm")
        label = gr.Markdown(elem_id="gallery-page-label")
        next_btn = gr.Button("Older ▶", size="sm")
        oldest_btn = gr.Button("Oldest ⏭", size="sm")
        refresh = gr.Button("Refresh", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            grid = gr.Gallery(
                label="Gallery", columns=4, height=520, fit_columns=False, interactive=False, elem_id="gallery-grid"
            )
        with gr.Column(scale=2, min_width=300):
            params_text = gr.Textbox(
                label="Parameters", lines=5, interactive=False, buttons=["copy"], elem_id="gallery-parameters"
            )
            details = gr.JSON(label="Details")
            with gr.Row():
                restore = gr.Button("Reuse in Text to image", size="sm")
                delete = gr.Button("Delete", variant="stop", size="sm")
    with gr.Accordion("PNG info: read the parameters of a picture", open=False), gr.Row(equal_height=False):
        png = image_upload(
            label="Drop a PNG (or an A1111 JPEG or WebP)", sources=["upload"], height=260, elem_id="png-info"
        )
        with gr.Column(min_width=300):
            png_text = gr.Textbox(label="Parameters text", lines=5, interactive=False)
            png_parsed = gr.JSON(label="Parsed")
            png_restore = gr.Button("Send to Text to image", size="sm")

    def show(page_number: int):  # type: ignore[no-untyped-def]
        images, file_names, text, page_number = gallery_page(studio, page_number)
        return gr.Gallery(images, selected_index=None), file_names, text, page_number, None, "", None

    page_outputs = [grid, names, label, page, chosen, params_text, details]

    def refreshed(page_number: int):  # type: ignore[no-untyped-def]
        try:
            studio.gallery.refresh()  # pictures added to or removed from the folder by hand
        except GalleryError as exc:
            raise error(str(exc)) from None
        return show(page_number)

    newest_btn.click(lambda: show(0), outputs=page_outputs, **PRIVATE)
    prev_btn.click(lambda p: show(p - 1), inputs=page, outputs=page_outputs, **PRIVATE)
    next_btn.click(lambda p: show(p + 1), inputs=page, outputs=page_outputs, **PRIVATE)
    oldest_btn.click(lambda: show(LAST_PAGE), outputs=page_outputs, **PRIVATE)
    refresh.click(refreshed, inputs=page, outputs=page_outputs, **PRIVATE)

    def select(file_names: list[str], evt: gr.SelectData):  # type: ignore[no-untyped-def]
        file_name = file_names[evt.index] if 0 <= evt.index < len(file_names) else None
        return (file_name, *entry_details(studio, file_name))

    grid.select(select, inputs=names, outputs=[chosen, params_text, details], **PRIVATE)

    def remove(file_name: str | None, page_number: int, file_names: list[str]):  # type: ignore[no-untyped-def]
        if file_name is None:
            return leave_as_is("Select an image first.", len(page_outputs))
        if any(studio.gallery.file_path(name) is None for name in file_names):
            # A picture of the page went meanwhile: Gradio refuses a click on it before it reaches `select`, and the
            # grid shows it selected while the picture chosen before stays chosen. Delete nothing that is not seen.
            gr.Warning("The gallery changed since this page was shown: here it is again; select the picture anew.")
            return show(page_number)
        entry = studio.gallery.find(file_name)
        if entry is not None:
            try:
                studio.gallery.delete(file_name)
            except OSError as exc:  # a read-only folder; the message without the server's paths
                raise error(f"Could not delete image #{entry.id}: {exc.strerror or 'the gallery failed'}.") from None
            gr.Info(f"Deleted image #{entry.id}.")
        return show(page_number)

    delete.click(remove, inputs=[chosen, page, names], outputs=page_outputs, **PRIVATE)

    def restore_into_form(nothing: str) -> Callable[[str, str], list[Any]]:
        def restore_entry(text: str, form_model: str) -> list[Any]:
            if not text:
                return leave_as_is(nothing, len(t2i.restorable()) + 1)
            parameters = a1111_to_parameters(parse_parameters(text))
            values = form_values(parameters, studio, t2i.restorable_names, form_model)
            return [*values, gr.Tabs(selected="txt2img")]

        return restore_entry

    restore_outputs = [*t2i.restorable(), tabs]
    restore_entry = restore_into_form("Select an image first.")
    restore.click(restore_entry, inputs=[params_text, t2i.fields["model_id"]], outputs=restore_outputs, **PRIVATE)
    png.upload(png_info, inputs=png, outputs=[png_text, png_parsed], **PRIVATE)  # .change fired twice per drop
    png.clear(lambda: ("", None), outputs=[png_text, png_parsed], **PRIVATE)
    restore_png = restore_into_form("Drop a picture with parameters first.")
    png_restore.click(restore_png, inputs=[png_text, t2i.fields["model_id"]], outputs=restore_outputs, **PRIVATE)
    return page, page_outputs, show


# PNG text chunks by which other tools' pictures are known: what they hold instead of A1111 parameters.
OTHER_TOOLS = {"workflow": "ComfyUI's workflow", "invokeai_metadata": "InvokeAI's metadata"}


def png_info(path: str | None) -> tuple[str, dict[str, Any] | None]:
    """The parameters text of a dropped PNG and its parsed fields; a warning and empty boxes when it has none."""
    if not path:
        return "", None
    try:
        with Image.open(path) as image:
            text = read_parameters(image)
            other_tool = next((tool for chunk, tool in OTHER_TOOLS.items() if chunk in image.info), None)
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) // 1_000_000  # Pillow's refusal of decompression bombs
        gr.Warning(f"This image is too large to read (over {limit} megapixels).")
        return "", None
    except (OSError, ValueError):
        gr.Warning("Not a readable image.")
        return "", None
    if text is None and other_tool is not None:
        gr.Warning(f"This picture holds {other_tool}, not A1111 parameters: DreamSketch cannot read them.")
        return "", None
    if text is None:
        gr.Warning("This picture has no A1111 parameters (a PNG 'parameters' chunk or an EXIF UserComment).")
        return "", None
    return text, parse_parameters(text)


# -- Models & status, Docs --------------------------------------------------------------------------------------

MODEL_COLUMNS = ["id", "name", "family", "width", "height", "steps", "guidance_scale", "loaded", "available"]
# Wide enough that no header breaks mid-word.
MODEL_COLUMN_WIDTHS: list[str | int] = ["16%", "27%", "7%", "7%", "7%", "6%", "14%", "7%", "9%"]


def status_values(studio: Studio):  # type: ignore[no-untyped-def]
    models = studio.models()
    rows = [[m[c] for c in MODEL_COLUMNS] for m in models]
    return studio.status(), rows, *model_dropdowns(models)


def model_dropdowns(models: list[dict[str, Any]]) -> tuple[gr.Dropdown, gr.Dropdown]:
    """Both tabs' model dropdowns with current labels (loaded, ready offline, needs download)."""
    choices = model_choices(models)
    return gr.Dropdown(choices=choices), gr.Dropdown(choices=choices)


DOCS = """
## Use DreamSketch from code

The same server answers the browser, `gradio_client`, plain HTTP and MCP.

### Python (`pip install gradio_client`)

```python
from gradio_client import Client, handle_file

client = Client("{url}")            # auth: Client(url, auth=("user", "password"))
images, info = client.predict(
    prompt="a lighthouse at sunset, oil painting",
    negative_prompt="blurry",
    model_id="{model}",
    width={width}, height={height}, steps={steps}, guidance_scale={guidance},
    seed=-1, scheduler="Default", batch_size=1,
    api_name="/txt2img",
)
print(info["seeds"], images[0]["image"])   # local path of the first PNG

job = client.submit(prompt="a red fox in snow", api_name="/txt2img")
print(job.status().progress_data)           # steps done so far (None until it starts); job.cancel() stops it

images, info = client.predict(
    image=handle_file("input.png"), prompt="the same, as a watercolor", strength=0.6,
    api_name="/img2img",
)
```

Parameters left out take the chosen model's own size, steps, guidance and scheduler. Errors name the field,
e.g. `field 'width': must be a multiple of 8 (got 500)`.

### HTTP (curl)

```bash
curl {url}/api/models/
curl -X POST {url}/api/txt2img/ -H 'Content-Type: application/json' \\
     -d '{{"prompt": "a lighthouse at sunset", "steps": 20, "seed": 42}}'
curl -X POST {url}/api/img2img/ -F image=@input.png -F prompt="watercolor" -F strength=0.6
curl '{url}/api/results/?limit=5'
```

Replies are `{{"status": "success", "result": {{"id", "url", "seed", ...}}}}`; the PNG is at `result.url`.
OpenAPI: [{url}/api/openapi.json]({url}/api/openapi.json). With `DREAMSKETCH_AUTH` set, add `-u user:password`.

### MCP (agents)

DreamSketch is an MCP server: the tools `txt2img` and `img2img` are served at
`{url}/gradio_api/mcp/` (streamable HTTP) and `{url}/gradio_api/mcp/sse` (SSE); their list and parameters are
at [{url}/gradio_api/mcp/schema]({url}/gradio_api/mcp/schema). `img2img` takes its image as a base64 data URL
(`data:image/png;base64,...`).

```json
{{"mcpServers": {{"dreamsketch": {{"url": "{url}/gradio_api/mcp/"}}}}}}
```
"""


def docs_markdown(studio: Studio, url: str | None = None) -> str:
    """The Docs tab for the address the page was opened at (`url`), or else the configured one."""
    width, height, steps, guidance = model_defaults(studio, studio.default_model)
    return DOCS.format(
        url=url or studio.settings.local_url,
        model=studio.default_model,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
    )


def page_url(request: gr.Request) -> str:
    """The address the browser reached this app at (behind a proxy such as Spaces', the one it forwarded)."""
    headers = {key.lower(): value for key, value in dict(request.headers).items()}
    if request.request is None:
        return origin(headers, "http", "127.0.0.1")
    return origin(headers, request.request.url.scheme, request.request.url.netloc)


# ---------------------------------------------------------------------------------------------------------------


def build_demo(studio: Studio) -> gr.Blocks:
    handlers = Handlers(studio)
    model_labels = model_choices(studio.models())  # one look at every model's files for both forms
    with gr.Blocks(title="DreamSketch", delete_cache=UPLOADS_KEPT) as demo:
        gr.Markdown("# DreamSketch\nText-to-image and image-to-image on your own machine.", elem_classes="ds-header")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="txt2img"):
                t2i = build_form(studio, "txt2img", model_labels)
            with gr.Tab("Image to image", id="img2img"):
                i2i = build_form(studio, "img2img", model_labels)
            with gr.Tab("Gallery", id="gallery") as gallery_tab:
                page, page_outputs, show_page = build_gallery_tab(studio, t2i, tabs)
            with gr.Tab("Models & status", id="status") as status_tab:
                status_json = gr.JSON(label="Status")
                models_table = gr.Dataframe(
                    headers=MODEL_COLUMNS,
                    label="Models",
                    interactive=False,
                    wrap=True,
                    column_widths=MODEL_COLUMN_WIDTHS,
                    elem_id="models-table",
                )
                refresh_status = gr.Button("Refresh", size="sm")
            with gr.Tab("Docs", id="docs"):
                docs = gr.Markdown(docs_markdown(studio))
        wire_api(studio, handlers)
        model_fields = [t2i.fields["model_id"], i2i.fields["model_id"]]
        for form in (t2i, i2i):  # a generation may load and unload models: the labels follow
            generated = wire_form(form, handlers, studio)
            generated.then(lambda: model_dropdowns(studio.models()), outputs=model_fields, **PRIVATE)
        wire_transfers(studio, t2i, i2i, tabs)

        status_outputs = [status_json, models_table, *model_fields]
        refresh_status.click(lambda: status_values(studio), outputs=status_outputs, **PRIVATE)
        status_tab.select(lambda: status_values(studio), outputs=status_outputs, **PRIVATE)
        # Not queued: with a small DREAMSKETCH_QUEUE_SIZE a page's load events alone filled the queue ("busy").
        loaded: dict[str, Any] = {"queue": False, **PRIVATE}
        demo.load(lambda: status_values(studio), outputs=status_outputs, **loaded)  # "loaded" labels are current
        gallery_tab.select(show_page, inputs=page, outputs=page_outputs, **PRIVATE)

        def docs_for_this_page(request: gr.Request) -> str:
            return docs_markdown(studio, page_url(request))

        demo.load(docs_for_this_page, outputs=docs, **loaded)  # on a LAN or a Space, not 127.0.0.1
        demo.load(show_page, inputs=page, outputs=page_outputs, **loaded)
    return demo
