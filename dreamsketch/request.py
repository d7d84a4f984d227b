"""The one place where a generation request is checked; UI, HTTP API and CLI all come through here."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from dreamsketch.registry import MAX_PROMPT_CHARS, ModelSpec, Registry
from dreamsketch.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

MAX_SEED = 2**32 - 1
MAX_BATCH = 8
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_AREA_FACTOR = 4
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
UNREADABLE_IMAGE = "not a readable PNG, JPEG or WebP image"
PIL_FORMATS = (*IMAGE_FORMATS, "MPO")  # Pillow names a phone's JPEG with more pictures in it (MPF) MPO
SIXTEEN_BIT_GREY = ("I", "I;16", "I;16B", "I;16L")  # Pillow's modes for a 16-bit greyscale PNG
_URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
DEFAULT_STRENGTH = 0.6

Mode = Literal["txt2img", "img2img"]
_COMMON_FIELDS = (
    "prompt",
    "negative_prompt",
    "model_id",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "batch_size",
)
FIELDS: dict[str, tuple[str, ...]] = {
    "txt2img": _COMMON_FIELDS,
    "img2img": ("image", *_COMMON_FIELDS, "strength"),
}
_ALLOWED_CONTROL = {"\n", "\t", "\r"}


class RequestError(ValueError):
    """A request field breaks its rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"field '{field}': {rule}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    model_id: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    batch_size: int
    strength: float | None = None
    image: Image.Image | None = None  # img2img: RGB, already at width x height

    @property
    def mode(self) -> Mode:
        return "txt2img" if self.image is None else "img2img"

    @property
    def denoising_steps(self) -> int:
        """The steps a progress bar counts: img2img skips the first (1 - strength) of them, as diffusers does."""
        return self.steps if self.strength is None else min(int(self.steps * self.strength), self.steps)

    def with_seed(self) -> GenerationRequest:
        """This request with seed -1 replaced by a freshly drawn seed."""
        if self.seed != -1:
            return self
        return replace(self, seed=random.randint(0, MAX_SEED))

    def image_seeds(self) -> list[int]:
        """One seed per image of the batch: seed, seed+1, ... as AUTOMATIC1111 numbers them."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]


def parse_request(fields: Mapping[str, Any], registry: Registry, mode: Mode, default_model: str) -> GenerationRequest:
    """Check every field against DESIGN.md's bounds; fields left out (or None) take the model's defaults."""
    if not isinstance(fields, Mapping):
        raise RequestError("body", "must be an object of request fields")
    allowed = FIELDS[mode]
    for name in fields:
        if name not in allowed:
            raise RequestError(str(name), f"unknown field for {mode}; expected some of {', '.join(allowed)}")
    given = {k: v for k, v in fields.items() if v is not None}

    model_id = given.get("model_id", default_model)
    if not isinstance(model_id, str) or model_id not in registry:
        raise RequestError("model_id", f"must be one of {', '.join(registry.ids())}")
    spec = registry.get(model_id)

    width = _int(given, "width", spec.width, MIN_SIDE, MAX_SIDE)
    height = _int(given, "height", spec.height, MIN_SIDE, MAX_SIDE)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise RequestError(name, f"must be a multiple of 8 (got {value})")
    _check_area(spec, width, height)

    scheduler = given.get("scheduler")
    if scheduler == DEFAULT_SCHEDULER:
        scheduler = None
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULERS):
        raise RequestError(
            "scheduler", f"must be {DEFAULT_SCHEDULER} (the model's own) or one of {', '.join(SCHEDULERS)}"
        )

    image = None
    strength = None
    if mode == "img2img":
        if "image" not in given:
            raise RequestError("image", "required for img2img")
        image = check_image(given["image"]).resize((width, height), Image.Resampling.LANCZOS)
        strength = _number(given, "strength", DEFAULT_STRENGTH, 0.0, 1.0, low_included=False)

    steps = _int(given, "steps", spec.steps, 1, MAX_STEPS)
    if strength is not None and int(steps * strength) < 1:
        raise RequestError("strength", f"steps x strength must be at least 1 step (got {steps} x {strength:g})")
    return GenerationRequest(
        prompt=_text(given, "prompt"),
        negative_prompt=_text(given, "negative_prompt"),
        model_id=model_id,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=_number(given, "guidance_scale", spec.guidance_scale, 0.0, MAX_GUIDANCE),
        seed=_int(given, "seed", -1, -1, MAX_SEED),
        scheduler=scheduler,
        batch_size=_int(given, "batch_size", 1, 1, MAX_BATCH),
        strength=strength,
        image=image,
    )


def _text(given: Mapping[str, Any], name: str) -> str:
    value = given.get(name, "")
    if not isinstance(value, str):
        raise RequestError(name, "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"at most {MAX_PROMPT_CHARS} characters (got {len(value)})")
    if any(ord(c) < 32 and c not in _ALLOWED_CONTROL or c == "\x7f" for c in value):
        raise RequestError(name, "must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(name, "must be valid Unicode text (no lone surrogates)") from None
    return value


def _int(given: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = given.get(name, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise RequestError(name, f"must be a whole number from {low} to {high}")
    if not low <= value <= high:
        raise RequestError(name, f"must be from {low} to {high} (got {_shown(value)})")
    return value


def _number(
    given: Mapping[str, Any], name: str, default: float, low: float, high: float, low_included: bool = True
) -> float:
    value = given.get(name, default)
    bounds = f"from {low:g} to {high:g}" if low_included else f"more than {low:g} and at most {high:g}"
    if type(value) is float and not math.isfinite(value) or type(value) not in (int, float):
        raise RequestError(name, f"must be a finite number {bounds}")
    # compared exactly: an int too large for a float is simply out of range
    if not (low <= value if low_included else low < value) or value > high:
        raise RequestError(name, f"must be {bounds} (got {_shown(value)})")
    return float(value) or 0.0  # -0.0 becomes 0.0, which metadata writes as "0" rather than "-0"


def _shown(value: float) -> str:
    """A number for a message: as given when short; a huge int only by its size (no float or digit-limit overflow)."""
    if not isinstance(value, int):
        return f"{value:g}"
    if abs(value) < 10**15:
        return str(value)
    return f"{'-' if value < 0 else ''}about 10^{value.bit_length() * math.log10(2):.0f}"


def _check_area(spec: ModelSpec, width: int, height: int) -> None:
    limit = MAX_AREA_FACTOR * spec.native_area
    if width * height > limit:
        raise RequestError(
            "height" if height * spec.width > width * spec.height else "width",  # the one further past its own
            f"width*height must be at most {MAX_AREA_FACTOR}x the model's native area "
            f"({spec.width}x{spec.height}): {width}x{height} is too large",
        )


def check_image(value: Any) -> Image.Image:
    """An RGB image from PNG/JPEG/WebP bytes or a PIL image, within the size and pixel limits, as viewers show it."""
    if isinstance(value, Image.Image):
        if value.format is not None and value.format not in PIL_FORMATS:
            raise RequestError("image", f"must be a PNG, JPEG or WebP image (got {value.format})")
        _check_pixels(value.width, value.height)
        try:
            value.load()
        except OSError:
            raise RequestError("image", UNREADABLE_IMAGE) from None
        return _as_shown(value)
    if not isinstance(value, bytes | bytearray):
        raise RequestError("image", "must be a PNG, JPEG or WebP file")
    if not value:
        raise RequestError("image", "is empty (0 bytes)")
    _check_bytes(len(value))
    try:
        with Image.open(io.BytesIO(value), formats=IMAGE_FORMATS) as opened:
            _check_pixels(opened.width, opened.height)
            opened.load()
            return _as_shown(opened)
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError("image", f"at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError("image", UNREADABLE_IMAGE) from None


def _check_bytes(size: int) -> None:
    if size > MAX_IMAGE_BYTES:
        raise RequestError("image", f"at most {MAX_IMAGE_BYTES // (1024 * 1024)} MB (got {size} bytes)")


def decode_image(value: Any) -> bytes:
    """Bytes from a base64 data URL ("data:image/png;base64,...") or bare base64, standard or URL-safe, with or
    without its "=" padding."""
    if not isinstance(value, str):
        raise RequestError("image", "must be a base64 data URL string (data:image/png;base64,...)")
    value = value.strip()
    if _URL.match(value):
        raise RequestError("image", "URLs are not accepted; send a base64 data URL (data:image/png;base64,...)")
    payload = value
    if value[:5].lower() == "data:":
        header, comma, payload = value.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise RequestError("image", "must be a base64 data URL (data:image/png;base64,...)")
    payload = "".join(payload.split())
    _check_bytes(len(payload.rstrip("=")) * 3 // 4)  # the bytes it holds, before decoding what could only be refused
    payload = payload.translate(_URL_SAFE_TO_STANDARD)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image", "not valid base64") from None


def _as_shown(image: Image.Image) -> Image.Image:
    """RGB turned upright by its EXIF orientation, with any transparency flattened onto white (as AUTOMATIC1111
    flattens img2img input)."""
    # Malformed EXIF (Pillow raises whatever its parser meets): the picture is used as stored, as viewers show it.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_GREY:
        image = _eight_bit_grey(image)
    if not image.has_transparency_data:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, "white")
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _eight_bit_grey(image: Image.Image) -> Image.Image:
    """PNG's 16-bit grey (0..65535, which convert() would clip at 255) as 8-bit, its transparent shade kept."""
    values = np.asarray(image.convert("I"))
    grey = Image.fromarray((values // 257).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def _check_pixels(width: int, height: int) -> None:
    if not width or not height:
        raise RequestError("image", f"has no pixels (got {width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError("image", f"at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels (got {width}x{height})")
