import base64
import io
import math
import zlib

import numpy as np
import pytest
from PIL import Image

from dreamsketch.registry import load_registry
from dreamsketch.request import MAX_SEED, RequestError, check_image, decode_image, parse_request
from dreamsketch.schedulers import SCHEDULERS
from tests.conftest import entry, write_registry


@pytest.fixture
def registry(tmp_path):
    return load_registry(write_registry(tmp_path / "m.yaml", [entry("tiny", "builtin:tiny", size=128)]))


def png_bytes(size=(32, 32), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=fmt)
    return buffer.getvalue()


def parse(registry, mode="txt2img", **fields):
    return parse_request(fields, registry, mode, "tiny")


def test_defaults_come_from_the_model(registry):
    request = parse(registry, prompt="a fox")
    assert (request.width, request.height, request.steps, request.guidance_scale) == (128, 128, 4, 7.5)
    assert (request.seed, request.batch_size, request.scheduler, request.mode) == (-1, 1, None, "txt2img")
    assert parse(registry, prompt=None, seed=None).prompt == ""
    assert parse(registry, scheduler="Default").scheduler is None  # the name the UI and gradio_client show


@pytest.mark.parametrize(
    "field, good",
    [
        ("width", [64, 128, 256, 136]),
        ("height", [64, 256]),
        ("steps", [1, 150]),
        ("guidance_scale", [0, 0.0, 30, 7.5]),
        ("seed", [-1, 0, MAX_SEED]),
        ("batch_size", [1, 8]),
        ("scheduler", list(SCHEDULERS)),
        ("prompt", ["", "x" * 2000, "émoji 🦊 𝔘 \U000e0041", "two\nlines\tand tab"]),
        ("negative_prompt", ["", "x" * 2000]),
    ],
)
def test_values_inside_the_bounds(registry, field, good):
    for value in good:
        assert getattr(parse(registry, **{field: value}), field) == value


@pytest.mark.parametrize(
    "field, bad, rule",
    [
        ("width", [56, 2056, 0, -8], "from 64 to 2048"),
        ("width", [100, 132], "multiple of 8"),
        ("width", [128.5, "128", True, [128]], "whole number"),
        ("height", [63, 4096], "from 64 to 2048"),
        ("steps", [0, 151, -1], "from 1 to 150"),
        ("steps", ["30", 2.5], "whole number"),
        ("guidance_scale", [-0.1, 30.01], "from 0 to 30"),
        ("guidance_scale", [math.nan, math.inf, -math.inf, "7"], "finite number"),
        ("seed", [-2, MAX_SEED + 1], "from -1 to"),
        ("seed", ["7", 1.5], "whole number"),
        ("batch_size", [0, 9], "from 1 to 8"),
        (
            "scheduler",
            ["Euler A", "euler", "", "default", 3, {}, ["DDIM"]],
            "must be Default (the model's own) or one of",
        ),
        ("prompt", ["x" * 2001], "at most 2000 characters"),
        ("prompt", [5, ["a"], b"bytes"], "must be a string"),
        ("prompt", ["nul\x00", "bell\x07", "esc\x1b[31m", "del\x7f"], "control characters"),
        ("prompt", ["lone \ud800 surrogate"], "valid Unicode"),
        ("negative_prompt", ["y" * 2001], "at most 2000"),
        ("model_id", ["nope", "../etc", "", 5], "must be one of tiny"),
    ],
)
def test_values_outside_the_bounds_name_field_and_rule(registry, field, bad, rule):
    for value in bad:
        with pytest.raises(RequestError) as error:
            parse(registry, **{field: value})
        assert error.value.field == field
        assert str(error.value).startswith(f"field '{field}': ") and rule in str(error.value)


def test_negative_zero_guidance_is_zero(registry):
    for value in (-0.0, 0, 0.0):
        guidance = parse(registry, guidance_scale=value).guidance_scale
        assert guidance == 0.0 and math.copysign(1, guidance) == 1 and f"{guidance:g}" == "0"


def test_area_is_bounded_by_four_times_native(registry):
    assert parse(registry, width=256, height=256).width == 256
    with pytest.raises(RequestError, match="4x the model's native area"):
        parse(registry, width=264, height=256)


def test_unknown_fields_and_non_mapping_bodies(registry):
    with pytest.raises(RequestError, match="field 'colour': unknown field"):
        parse(registry, colour="red")
    with pytest.raises(RequestError, match="field 'strength': unknown field for txt2img"):
        parse(registry, strength=0.5)
    with pytest.raises(RequestError, match="field 'body'"):
        parse_request(["prompt"], registry, "txt2img", "tiny")  # type: ignore[arg-type]


def test_img2img_image_and_strength(registry):
    request = parse(registry, "img2img", image=png_bytes(), strength=1)
    assert request.mode == "img2img" and request.strength == 1.0
    assert request.image.size == (128, 128)  # the model's size: resized once, here, for every interface
    assert parse(registry, "img2img", image=png_bytes(), width=64, height=96).image.size == (64, 96)
    assert parse(registry, "img2img", image=png_bytes(fmt="JPEG")).strength == 0.6
    assert parse(registry, "img2img", image=png_bytes(fmt="WEBP")).image.mode == "RGB"
    assert parse(registry, "img2img", image=Image.new("RGBA", (8, 8))).image.mode == "RGB"
    for strength, message in ((0, "(got 0)"), (-0.1, "(got -0.1)"), (1.01, "(got 1.01)"), (math.nan, "")):
        with pytest.raises(RequestError, match=r"field 'strength': must be .*more than 0 and at most 1") as error:
            parse(registry, "img2img", image=png_bytes(), strength=strength)
        assert str(error.value).endswith(message)
    with pytest.raises(
        RequestError, match=r"field 'strength': steps x strength must be at least 1 step \(got 4 x 0.2\)"
    ):
        parse(registry, "img2img", image=png_bytes(), strength=0.2)
    assert parse(registry, "img2img", image=png_bytes(), strength=0.25).strength == 0.25
    assert parse(registry, "img2img", image=png_bytes(), steps=20, strength=0.6).denoising_steps == 12
    assert parse(registry, steps=20).denoising_steps == 20
    with pytest.raises(RequestError, match="field 'image': required"):
        parse(registry, "img2img", prompt="x")


@pytest.mark.parametrize(
    "data, rule",
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable"),
        (png_bytes()[:60], "not a readable"),
        (png_bytes(fmt="JPEG")[:200], "not a readable"),
        (png_bytes(fmt="GIF"), "not a readable"),
        (b"\0" * (20 * 1024 * 1024 + 1), "at most 20 MB"),
        ("data:image/png;base64,xxx", "must be a PNG"),
    ],
)
def test_bad_images(data, rule):
    with pytest.raises(RequestError, match=rule) as error:
        check_image(data)
    assert error.value.field == "image"


def test_sixteen_bit_grey_png_keeps_its_shades():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 200, 32768, 65535]], dtype=np.uint16)).save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert opened.mode == "I;16"
    image = check_image(buffer.getvalue())
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (0, 0, 0), (127, 127, 127), (255, 255, 255)]
    buffer = io.BytesIO()
    Image.fromarray(np.array([[1000, 32768]], dtype=np.uint16)).save(buffer, format="PNG", transparency=1000)
    image = check_image(buffer.getvalue())  # its transparent shade is flattened onto white, as any transparency
    assert [image.getpixel((x, 0)) for x in range(2)] == [WHITE, (127, 127, 127)]


def test_pil_images_are_held_to_the_same_rules():
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(gif, format="GIF")
    truncated = Image.open(io.BytesIO(png_bytes((64, 64))[:-30]))  # opens; its pixels cannot be read
    for value, rule in (
        (Image.open(gif), "must be a PNG, JPEG or WebP image (got GIF)"),
        (truncated, "not a readable PNG, JPEG or WebP image"),
        (Image.new("RGB", (0, 0)), "has no pixels (got 0x0)"),
        (Image.new("RGB", (1, 0)), "has no pixels (got 1x0)"),
    ):
        with pytest.raises(RequestError) as error:
            check_image(value)
        assert str(error.value) == f"field 'image': {rule}"
    assert check_image(Image.new("RGB", (4, 4), "red")).getpixel((0, 0)) == (255, 0, 0)  # made in memory: no format
    phone = io.BytesIO()  # a JPEG with a second picture in it, as phones write them: Pillow calls it MPO
    Image.new("RGB", (8, 8), "red").save(phone, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    with Image.open(io.BytesIO(phone.getvalue())) as opened:
        assert opened.format == "MPO" and close(check_image(opened).getpixel((0, 0)), RED)


def test_decompression_bomb_header_is_refused_before_decoding():
    png = bytearray(png_bytes((1, 1)))
    png[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # a valid IHDR checksum for the lie
    with pytest.raises(RequestError, match="at most 40 megapixels"):
        check_image(bytes(png))
    with pytest.raises(RequestError, match="at most 40 megapixels"):
        check_image(Image.new("1", (8000, 5001)))


def test_random_seed_is_drawn_and_batch_seeds_follow(registry):
    request = parse(registry, seed=-1, batch_size=3).with_seed()
    assert 0 <= request.seed <= MAX_SEED
    assert request.image_seeds() == [(request.seed + i) % 2**32 for i in range(3)]
    assert parse(registry, seed=MAX_SEED, batch_size=2).image_seeds() == [MAX_SEED, 0]


RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def left_and_right(image):
    """The colours at the middle of the left and of the right edge."""
    return image.getpixel((1, image.height // 2)), image.getpixel((image.width - 2, image.height // 2))


def close(colour, expected):
    return all(abs(a - b) <= 24 for a, b in zip(colour, expected, strict=True))


def test_exif_orientation_is_applied_before_the_resize(registry):
    shown = Image.new("RGB", (48, 24), BLUE)
    shown.paste(RED, (0, 0, 24, 24))
    exif = Image.Exif()
    exif[274] = 6  # Orientation: turn 90 degrees clockwise to show, as phones store a portrait photo
    buffer = io.BytesIO()
    shown.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    image = check_image(buffer.getvalue())
    assert image.size == (48, 24)
    resized = parse(registry, "img2img", image=buffer.getvalue(), width=128, height=64).image
    for left, right in (left_and_right(image), left_and_right(resized)):
        assert close(left, RED) and close(right, BLUE), (left, right)


# EXIF whose interoperability pointer leads Pillow's parser into a struct.error (found by a QA fuzz)
MALFORMED_EXIF = bytes.fromhex(
    "4578696600004d4d002a00000008000401020002000000070000003e01120003000000010006000001320002000000140000004687690004"
    "000000010000005a0000000043616d6572610000323032343a30313a30312030303a3030a93030000002829a00030000000200010064900300"
    "02000000140000007800000000323032343a30313a30312030303a30303a303000"
)


def test_malformed_exif_leaves_the_picture_as_stored(registry):
    """exif_transpose raised struct.error on such EXIF: a 500 on the HTTP API, a traceback in the CLI."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), RED).save(buffer, format="JPEG", exif=MALFORMED_EXIF)
    image = check_image(buffer.getvalue())
    assert image.size == (16, 8) and close(image.getpixel((0, 0)), RED)


def half_transparent(mode):
    """A PNG whose left half is opaque red and whose right half is transparent black."""
    image = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 8, 8))
    buffer = io.BytesIO()
    if mode in ("RGBA", "LA"):
        image.convert(mode).save(buffer, format="PNG")
    else:  # a palette, RGB or L image with a tRNS chunk naming its transparent colour
        flat = image.convert(mode, palette=Image.Palette.ADAPTIVE, colors=2) if mode == "P" else image.convert(mode)
        flat.save(buffer, format="PNG", transparency=flat.getpixel((12, 4)))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "P", "RGB", "LA", "L"])
def test_transparent_areas_become_white(mode):
    image = check_image(half_transparent(mode))
    grey = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0))
    assert left_and_right(image) == (RED if mode in ("RGBA", "P", "RGB") else (grey,) * 3, WHITE)


def test_transparency_of_a_pil_image_blends_with_white():
    image = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 8, 8))
    image.paste((0, 0, 0, 128), (4, 0, 8, 8))
    assert check_image(image).getpixel((1, 4)) == RED
    assert check_image(image).getpixel((5, 4)) == (127, 127, 127)
    assert check_image(image).getpixel((12, 4)) == WHITE


# base64 of these bytes uses both characters that differ in the URL-safe alphabet, and needs padding
RAW = b"\xfb\xff\xbf\xfe"


@pytest.mark.parametrize(
    "text",
    [
        "+/+//g==",
        "+/+//g",
        "-_-__g==",
        "-_-__g",
        "data:image/png;base64,-_-__g",
        "DATA:image/png;BASE64,+/+/\n/g",
        " \ndata:image/png;base64,+/+//g==\n",
    ],
)
def test_base64_without_padding_or_url_safe_is_decoded(text):
    assert base64.b64encode(RAW) == b"+/+//g=="
    assert decode_image(text) == RAW


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("https://example.com/cat.png", "URLs are not accepted; send a base64 data URL (data:image/png;base64,...)"),
        ("HTTP://example.com/cat.png", "URLs are not accepted; send a base64 data URL (data:image/png;base64,...)"),
        ("file:///etc/passwd", "URLs are not accepted; send a base64 data URL (data:image/png;base64,...)"),
        (" https://example.com/cat.png", "URLs are not accepted; send a base64 data URL (data:image/png;base64,...)"),
        ("+/+//", "not valid base64"),
        ("@@@@", "not valid base64"),
        ("data:image/png,abc", "must be a base64 data URL (data:image/png;base64,...)"),
        (5, "must be a base64 data URL string (data:image/png;base64,...)"),
        # refused before decoding (a 200 MB data URL took a second to decode, and was then refused)
        ("data:image/png;base64," + "A" * 28_000_000, "at most 20 MB (got 21000000 bytes)"),
    ],
)
def test_what_decode_image_refuses(text, rule):
    with pytest.raises(RequestError) as error:
        decode_image(text)
    assert str(error.value) == f"field 'image': {rule}"
