"""Property-based: parse_request, the one validation, accepts exactly the requests within DESIGN.md's bounds.

Whatever it is given it either returns a request inside every bound or raises RequestError naming a field;
no other exception ever escapes (an escape would be a 500 on the HTTP API and a traceback in the UI)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreamsketch.registry import Registry, load_registry
from dreamsketch.request import (
    FIELDS,
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    GenerationRequest,
    RequestError,
    check_image,
    parse_request,
)
from dreamsketch.schedulers import SCHEDULERS
from tests.conftest import entry, write_registry

NATIVE = 128
ALL_FIELDS = sorted(set(FIELDS["img2img"]))
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    folder = tmp_path_factory.mktemp("props")
    return load_registry(write_registry(folder / "m.yaml", [entry("tiny", "builtin:tiny", size=NATIVE)]))


def png(size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format=fmt)
    return buffer.getvalue()


SMALL_IMAGES = {fmt: png(fmt=fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")}

# Anything JSON can carry, plus what Python callers (the UI) may pass: floats of every kind, huge ints, bytes.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "128", "7.5", "NaN", "Infinity", "-1", "tiny", "Euler a", "../x", "\x00"])
)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids))
any_value = json_values | st.binary(max_size=64) | st.sampled_from(list(SMALL_IMAGES.values()))
field_names = st.sampled_from(ALL_FIELDS) | st.text(max_size=20)


def check_bounds(request: GenerationRequest, mode: str) -> None:
    """Every invariant a parsed request must hold (DESIGN.md, "Requests and their bounds")."""
    assert request.model_id == "tiny"
    for side in (request.width, request.height):
        assert type(side) is int and MIN_SIDE <= side <= MAX_SIDE and side % 8 == 0
    assert request.width * request.height <= 4 * NATIVE * NATIVE
    assert type(request.steps) is int and 1 <= request.steps <= MAX_STEPS
    assert type(request.guidance_scale) is float and math.isfinite(request.guidance_scale)
    assert 0 <= request.guidance_scale <= MAX_GUIDANCE
    assert type(request.seed) is int and -1 <= request.seed <= MAX_SEED
    assert type(request.batch_size) is int and 1 <= request.batch_size <= MAX_BATCH
    assert request.scheduler is None or request.scheduler in SCHEDULERS
    for text in (request.prompt, request.negative_prompt):
        assert isinstance(text, str) and len(text) <= MAX_PROMPT_CHARS
        assert not any(ord(c) < 32 and c not in "\n\t\r" or c == "\x7f" for c in text)
        text.encode("utf-8")
    if mode == "img2img":
        assert request.image is not None and request.image.mode == "RGB"
        assert request.strength is not None and 0 < request.strength <= 1
        assert int(request.steps * request.strength) >= 1
    else:
        assert request.image is None and request.strength is None


def parse_or_refuse(registry: Registry, fields: dict, mode: str) -> GenerationRequest | None:
    try:
        request = parse_request(fields, registry, mode, "tiny")  # type: ignore[arg-type]
    except RequestError as error:
        assert error.field in (*ALL_FIELDS, *map(str, fields)), error
        assert str(error).startswith(f"field '{error.field}': ") and error.rule
        return None
    check_bounds(request, mode)
    return request


@SETTINGS
@given(fields=st.dictionaries(field_names, any_value, max_size=6), mode=st.sampled_from(["txt2img", "img2img"]))
@example(fields={"guidance_scale": 10**400}, mode="txt2img")
@example(fields={"strength": -(10**400), "image": SMALL_IMAGES["PNG"]}, mode="img2img")
def test_any_fields_give_a_request_within_bounds_or_a_field_error(registry: Registry, fields: dict, mode: str) -> None:
    parse_or_refuse(registry, fields, mode)


printable = st.characters(codec="utf-8", min_codepoint=32).filter(lambda c: c != "\x7f") | st.sampled_from("\n\t\r")
sides = st.integers(MIN_SIDE // 8, 32).map(lambda n: n * 8)
valid_fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(alphabet=printable, max_size=MAX_PROMPT_CHARS),
        "negative_prompt": st.text(alphabet=printable, max_size=200),
        "model_id": st.just("tiny"),
        "width": sides,
        "height": sides,
        "steps": st.integers(1, MAX_STEPS),
        "guidance_scale": st.floats(0, MAX_GUIDANCE) | st.integers(0, 30),
        "seed": st.integers(-1, MAX_SEED),
        "scheduler": st.sampled_from(list(SCHEDULERS)),
        "batch_size": st.integers(1, MAX_BATCH),
    },
)


@SETTINGS
@given(fields=valid_fields)
def test_every_request_inside_the_bounds_is_accepted_as_given(registry: Registry, fields: dict) -> None:
    width, height = fields.get("width", NATIVE), fields.get("height", NATIVE)
    assume(width * height <= 4 * NATIVE * NATIVE)
    request = parse_or_refuse(registry, fields, "txt2img")
    assert request is not None, fields
    for name, value in fields.items():
        assert getattr(request, name) == value


@SETTINGS
@given(name=st.sampled_from(["width", "height", "steps", "seed", "batch_size", "guidance_scale"]), value=json_values)
def test_a_refused_value_names_its_field(registry: Registry, name: str, value: object) -> None:
    try:
        parse_request({name: value}, registry, "txt2img", "tiny")
    except RequestError as error:
        assert error.field in (name, "width")  # the area rule is reported on width


# Every Unicode plane (0..16) and the control characters: allowed text passes unchanged, controls are refused.
@SETTINGS
@given(
    text=st.text(alphabet=st.characters(codec="utf-8"), max_size=100),
    plane=st.integers(0, 16),
    offset=st.integers(0, 0xFFFF),
)
def test_prompts_from_every_unicode_plane(registry: Registry, text: str, plane: int, offset: int) -> None:
    code = plane * 0x10000 + offset
    assume(not 0xD800 <= code <= 0xDFFF)
    prompt = text + chr(code)
    request = parse_or_refuse(registry, {"prompt": prompt}, "txt2img")
    has_control = any(ord(c) < 32 and c not in "\n\t\r" or c == "\x7f" for c in prompt)
    assert (request is None) == has_control
    if request is not None:
        assert request.prompt == prompt


@pytest.mark.parametrize("code", [*range(0, 32), 0x7F, 0xD800, 0xDFFF])
def test_control_characters_and_lone_surrogates_are_refused(registry: Registry, code: int) -> None:
    text = f"a{chr(code)}b"
    if chr(code) in "\n\t\r":
        assert parse_or_refuse(registry, {"prompt": text}, "txt2img") is not None
        return
    with pytest.raises(RequestError, match="field 'negative_prompt'"):
        parse_request({"negative_prompt": text}, registry, "txt2img", "tiny")


# Images: mutated and truncated files never escape as anything but RequestError("image", ...).
@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
def test_damaged_images_are_refused_as_the_image_field(fmt: str, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL_IMAGES[fmt][: max(cut, 1)] if cut else SMALL_IMAGES[fmt])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    try:
        image = check_image(bytes(data))
    except RequestError as error:
        assert error.field == "image"
    else:
        assert image.mode == "RGB"


@given(data=st.binary(max_size=2048))
@settings(max_examples=200, deadline=None)
def test_random_bytes_are_refused_as_the_image_field(data: bytes) -> None:
    with pytest.raises(RequestError, match="field 'image'"):
        check_image(data)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed so that only the size is wrong)."""
    import struct
    import zlib

    data = bytearray(png())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("size", [(100_000, 100_000), (40_001, 1000), (2**31 - 1, 2**31 - 1), (7000, 7000)])
def test_a_png_header_claiming_huge_size_is_refused_without_decoding(size: tuple[int, int]) -> None:
    with pytest.raises(RequestError, match="field 'image': at most 40 megapixels"):
        check_image(png_claiming(*size))


def test_gif_bmp_and_text_uploads_are_refused(tmp_path: Path) -> None:
    for data in (SMALL_IMAGES["GIF"], SMALL_IMAGES["BMP"], b"<svg/>", b"%PDF-1.4", b"\x00" * 100, b""):
        with pytest.raises(RequestError, match="field 'image'"):
            check_image(data)
