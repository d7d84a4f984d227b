"""Bad input through gradio_client (the HTTP API's cases are in test_api.py and test_fuzz_api.py): each is refused
with an error that names the problem, the server keeps answering, and nothing reaches the gallery."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin

from dreamsketch.schedulers import DEFAULT_SCHEDULER
from dreamsketch.studio import Studio
from dreamsketch.ui import build_demo, form_values, png_info
from tests.servers import RunningServer, gradio_client, running_server, tiny_settings

FAST = {"model_id": "tiny-demo", "width": 64, "height": 64, "steps": 1}
UNEXPECTED = "Generation failed unexpectedly"
SKIP = gr.skip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(Studio(tiny_settings(tmp_path_factory.mktemp("client-inputs")))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    with gradio_client(server) as client:
        yield client


def image_bytes(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "purple").save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    data = bytearray(image_bytes("PNG", (8, 8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def refused(client: Client, server: RunningServer, api_name: str, words: str, **fields: Any) -> str:
    before = server.studio.gallery.count()
    with pytest.raises(AppError) as error:
        client.predict(**fields, api_name=api_name)
    message = str(error.value)
    assert words in message and UNEXPECTED not in message and "Traceback" not in message, message
    assert server.studio.gallery.count() == before
    return message


TXT2IMG_REFUSED = [
    ("huge seed", {"seed": 1e300}, "seed"),
    ("fractional steps", {"steps": 2.5}, "steps"),
    ("negative batch", {"batch_size": -1}, "batch_size"),
    ("area", {"width": 512, "height": 512}, "native area"),
    ("control character", {"prompt": "a\x1bb"}, "control characters"),
    ("NUL in negative", {"negative_prompt": "x\x00y"}, "negative_prompt"),
    ("prompt too long", {"prompt": "y" * 2001}, "2000"),
    ("traversal as model", {"model_id": "../../etc/passwd"}, "model_id"),
    ("encoded traversal as model", {"model_id": "%2e%2e%2fmodels"}, "model_id"),
    ("absolute path as model", {"model_id": "/etc/passwd"}, "model_id"),
    ("NUL model", {"model_id": "tiny-demo\x00"}, "model_id"),
    ("traversal as scheduler", {"scheduler": "../Euler"}, "scheduler"),
]


@pytest.mark.parametrize(("fields", "words"), [c[1:] for c in TXT2IMG_REFUSED], ids=[c[0] for c in TXT2IMG_REFUSED])
def test_txt2img_bad_values_are_refused(client: Client, server: RunningServer, fields: dict, words: str) -> None:
    refused(client, server, "/txt2img", words, **{"prompt": "x", **FAST, **fields})


# gradio_client cannot even send NaN or infinities (its JSON refuses them); Gradio's /call route, which it uses,
# accepts the literals: they reach parse_request and are refused there.
POSITIONS = {"steps": 5, "guidance_scale": 6, "seed": 7}


def call_route(server: RunningServer, api_name: str, data: str) -> str:
    """The events of a call on Gradio's /call route, with `data` (a JSON array's items) sent as they are."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = http.post(f"/gradio_api/call/{api_name}", content=f'{{"data": [{data}]}}',
                          headers={"content-type": "application/json"})  # fmt: skip
        assert reply.status_code == 200, reply.text
        return http.get(f"/gradio_api/call/{api_name}/{reply.json()['event_id']}").text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", POSITIONS)
def test_nan_and_infinities_on_gradios_call_route(server: RunningServer, field: str, literal: str) -> None:
    data = ['"x"', '""', '"tiny-demo"', "64", "64", "1", "7.5", "-1", '"Default"', "1"]
    data[POSITIONS[field]] = literal
    before = server.studio.gallery.count()
    events = call_route(server, "txt2img", ", ".join(data))
    assert "event: error" in events and f"field '{field}'" in events and "Traceback" not in events, events
    assert server.studio.gallery.count() == before


def img2img_with_data_url(server: RunningServer, data_url: str) -> str:
    """img2img on Gradio's /call route with the image as a data URL, as MCP clients send it."""
    image = json.dumps({"url": data_url, "meta": {"_type": "gradio.FileData"}})
    return call_route(server, "img2img", f'{image}, "x", "", "tiny-demo", 1.0, 64, 64, 1, 7.5, 5, "Default", 1')


DATA_URLS = [
    ("gif", image_bytes("GIF"), "field 'image': not a readable PNG, JPEG or WebP image"),
    ("truncated png", image_bytes("PNG")[:80], "field 'image': not a readable PNG, JPEG or WebP image"),
    ("over 20 MB", image_bytes("PNG") + b"\0" * (20 * 1024 * 1024), "field 'image': at most 20 MB"),
    ("100000x100000 header", png_claiming(100_000, 100_000), "field 'image': at most 40 megapixels"),
    ("empty", b"", "field 'image': is empty (0 bytes)"),
]


@pytest.mark.parametrize(("data", "words"), [d[1:] for d in DATA_URLS], ids=[d[0] for d in DATA_URLS])
def test_img2img_data_urls_meet_the_same_rules(server: RunningServer, data: bytes, words: str) -> None:
    """Gradio would decode a data URL itself and save it again as WebP, whatever it was: it reaches our checks."""
    before = server.studio.gallery.count()
    events = img2img_with_data_url(server, "data:image/png;base64," + base64.b64encode(data).decode())
    assert "event: error" in events and words in events and "Traceback" not in events, events[-500:]
    assert server.studio.gallery.count() == before


@pytest.mark.parametrize("around", ["", " \n"])
def test_img2img_data_url_of_a_png_is_used(server: RunningServer, around: str) -> None:
    encoded = base64.b64encode(image_bytes("PNG")).decode()
    events = img2img_with_data_url(server, f"{around}data:image/png;base64,{encoded}{around}")
    assert "event: complete" in events, events[-500:]
    assert server.studio.gallery.list(limit=1)[0].meta.strength == 1.0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": 5}, "field 'prompt': must be a string"),
        ({"negative_prompt": ["x"]}, "field 'negative_prompt': must be a string"),
        ({"model_id": 7}, "field 'model_id': must be one of"),
        ({"scheduler": ""}, "field 'scheduler': must be Default"),
    ],
)
def test_text_fields_take_only_their_own_values(
    client: Client, server: RunningServer, fields: dict, words: str
) -> None:
    """As over HTTP: Gradio's Textbox would make the text "5" of the number 5."""
    refused(client, server, "/txt2img", words, **{"prompt": "x", **FAST, **fields})


@pytest.mark.parametrize("value", ["twenty", "", "1e3", [64]])
def test_strings_and_lists_where_numbers_belong(client: Client, server: RunningServer, value: object) -> None:
    before = server.studio.gallery.count()
    with pytest.raises(AppError) as error:
        client.predict(prompt="x", **{**FAST, "steps": value}, api_name="/txt2img")
    assert UNEXPECTED not in str(error.value)
    assert server.studio.gallery.count() == before


def test_extra_and_missing_fields(client: Client, server: RunningServer) -> None:
    with pytest.raises(TypeError):  # gradio_client refuses unknown keywords before sending anything
        client.predict(prompt="x", sampler="Euler", api_name="/txt2img")
    _images, info = client.predict(prompt="only a prompt", api_name="/txt2img")  # missing fields: the defaults
    assert server.studio.gallery.get(info["ids"][0]) is not None


@pytest.mark.parametrize("plane", range(17))
def test_prompts_from_every_unicode_plane(client: Client, server: RunningServer, plane: int) -> None:
    prompt = "".join(chr(plane * 0x10000 + offset) for offset in (0x41, 0x1F600 % 0x10000, 0xFFFD)) + " \n\t fin"
    _images, info = client.predict(prompt=prompt, **FAST, api_name="/txt2img")
    assert server.studio.gallery.get(info["ids"][0]).meta.prompt == prompt  # type: ignore[union-attr]


UPLOADS = [
    ("zero bytes", b"", "image"),
    ("text", b"just some text, not an image", "image"),
    ("truncated png", image_bytes("PNG")[:80], "image"),
    ("truncated jpeg", image_bytes("JPEG")[: len(image_bytes("JPEG")) // 2], "image"),
    ("gif", image_bytes("GIF"), "image"),
    ("100000x100000 header", png_claiming(100_000, 100_000), "image"),
]


@pytest.mark.parametrize(("data", "words"), [u[1:] for u in UPLOADS], ids=[u[0] for u in UPLOADS])
def test_img2img_bad_uploads(client: Client, server: RunningServer, tmp_path: Path, data: bytes, words: str) -> None:
    for name in ("upload.png", "upload.jpg"):
        (tmp_path / name).write_bytes(data)
        message = refused(
            client, server, "/img2img", words, image=handle_file(str(tmp_path / name)), prompt="x", **FAST
        )
        assert message.startswith("field 'image': "), message  # ours, not Gradio's (which shows server paths)


def test_img2img_strength_out_of_bounds(client: Client, server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(image_bytes("PNG"))
    for strength in (0, -0.5, 1.5, 1e-9):
        refused(client, server, "/img2img", "strength", image=handle_file(str(tmp_path / "ok.png")), prompt="x",
                strength=strength, **FAST)  # fmt: skip


def test_the_server_still_works_after_all_of_it(client: Client, server: RunningServer) -> None:
    _images, info = client.predict(prompt="still fine", **FAST, api_name="/txt2img")
    assert server.studio.gallery.get(info["ids"][0]) is not None and server.studio.pending == 0


def test_uploads_over_20_mb_are_refused(server: RunningServer) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (20 * 1024 * 1024 + 1)
    reply = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("big.png", big)}, timeout=60)
    assert reply.status_code == 413 and "Traceback" not in reply.text, (reply.status_code, reply.text[:200])


def test_img2img_json_image_as_url_or_loose_base64(server: RunningServer) -> None:
    """The HTTP API's JSON `image` (its other cases are in test_api.py): a URL is refused with what to send instead;
    base64 without its padding, or in the URL-safe alphabet, is read."""
    body = {"prompt": "x", **FAST, "strength": 1.0}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = http.post("/api/img2img", json={**body, "image": "https://example.com/cat.png"})
        assert reply.status_code == 400 and reply.json()["error"] == (
            "field 'image': URLs are not accepted; send a base64 data URL (data:image/png;base64,...)"
        )
        padded = base64.urlsafe_b64encode(image_bytes("PNG", (63, 64))).decode()
        loose = padded.rstrip("=")
        assert loose != padded and "-" in loose  # it tests what it says
        reply = http.post("/api/img2img", json={**body, "image": f"data:image/png;base64,{loose}"})
        assert reply.status_code == 200, reply.text


def test_png_info_of_a_huge_picture_is_a_warning_not_pillows_error(tmp_path: Path) -> None:
    """Pillow's decompression-bomb error (its text, and a traceback in the log) reached the page."""
    (tmp_path / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    with pytest.warns(UserWarning, match=r"^This image is too large to read \(over \d+ megapixels\)\.$"):
        assert png_info(str(tmp_path / "huge.png")) == ("", None)


def test_restored_parameters_outside_the_rules_are_left_out_with_a_warning(tmp_path: Path) -> None:
    """Another tool's picture (Steps: 200, Size: 130x3000, a 64-bit seed) filled the form silently, and Generate
    then failed with Gradio's slider message, one field at a time."""
    studio = Studio(tiny_settings(tmp_path))
    parameters = {"prompt": "a fox", "width": 130, "height": 3000, "steps": 200, "guidance_scale": 5.0}
    parameters |= {"seed": 2**64 - 1, "model_id": "tiny-demo", "scheduler": "Euler"}
    names = ("prompt", "model_id", "width", "height", "steps", "guidance_scale", "seed", "scheduler")
    with pytest.warns(UserWarning) as warned:
        values = form_values(parameters, studio, names, "tiny-demo")
    assert dict(zip(names, values, strict=True)) == {
        "prompt": "a fox", "model_id": "tiny-demo", "width": SKIP, "height": SKIP, "steps": SKIP,
        "guidance_scale": 5.0, "seed": SKIP, "scheduler": "Euler",
    }  # fmt: skip
    assert [str(w.message).split(":")[0] for w in warned] == ["Height", "Steps", "Seed"]  # the form's labels
    assert [str(w.message).rsplit("; ", 1)[1] for w in warned] == [
        "Width and Height left as they were.", "Steps left as it was.", "Seed left as it was."
    ]  # fmt: skip


def test_a_restored_sampler_that_dreamsketch_lacks_restores_as_the_models_own(tmp_path: Path) -> None:
    """A1111's "DPM++ 2M SDE" with "Karras" set the form's scheduler to Default without a word. A diffusers class
    name (how a model's own scheduler without an A1111 name is recorded: DEIS) is that model's own, said silently."""
    studio = Studio(tiny_settings(tmp_path))
    names = ("steps", "scheduler")
    message = r"^Scheduler: DreamSketch has no 'DPM\+\+ 2M SDE Karras'; the model's own \(Default\) instead\.$"
    with pytest.warns(UserWarning, match=message):
        values = form_values({"steps": 20, "scheduler": "DPM++ 2M SDE Karras"}, studio, names, "tiny-demo")
    assert values == [20, DEFAULT_SCHEDULER]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for recorded in (None, "DEISMultistepScheduler", "Heun"):
            expected = recorded if recorded == "Heun" else DEFAULT_SCHEDULER
            assert form_values({"scheduler": recorded}, studio, names, "tiny-demo") == [SKIP, expected]


def test_a_restored_size_is_checked_whole_against_the_model_the_form_will_have(tmp_path: Path) -> None:
    """Each side was checked alone against the server's default model: 256x256 passed for a 64x64 model (and
    Generate refused it), 512x128 was refused for a 128x128 model chosen in the form."""
    registry = tmp_path / "models.yaml"
    small = {"id": "small", "name": "small", "source": "builtin:tiny", "family": "sd15", "steps": 4}
    small |= {"width": 64, "height": 64, "guidance_scale": 7.5}
    registry.write_text(yaml.safe_dump([small, {**small, "id": "tiny-demo", "width": 128, "height": 128}]))
    studio = Studio(tiny_settings(tmp_path, default_model="small"))
    names = ("model_id", "width", "height")
    with pytest.warns(UserWarning, match=r"native area \(64x64\): 256x256 is too large; Width and Height left"):
        assert form_values({"width": 256, "height": 256}, studio, names, "small") == [SKIP, SKIP, SKIP]
    with pytest.warns(UserWarning, match="^Model 'v1-5-pruned' is not in this registry; the model is unchanged.$"):
        values = form_values({"width": 512, "height": 128, "model_id": "v1-5-pruned"}, studio, names, "tiny-demo")
    assert values == [SKIP, 512, 128]  # fits tiny-demo, the form's model, not "small", the server's default
    with pytest.warns(UserWarning, match=r"1024x1024 is too large; the model's own size \(64x64\) instead\.$"):
        values = form_values({"width": 1024, "height": 1024, "model_id": "small"}, studio, names, "tiny-demo")
    assert values == ["small", 64, 64]  # the form's size (tiny-demo's) may not fit the model restored either


@pytest.mark.parametrize(("chunk", "tool"), [("workflow", "ComfyUI's workflow"), ("invokeai_metadata", "InvokeAI's")])
def test_png_info_names_the_tool_whose_metadata_a_picture_holds(tmp_path: Path, chunk: str, tool: str) -> None:
    """A ComfyUI or InvokeAI picture got only "no A1111 parameters", as if it carried nothing."""
    info = PngImagePlugin.PngInfo()
    info.add_text(chunk, '{"nodes": []}')
    Image.new("RGB", (8, 8)).save(tmp_path / "other.png", pnginfo=info)
    with pytest.warns(UserWarning, match=f"^This picture holds {tool}.*, not A1111 parameters"):
        assert png_info(str(tmp_path / "other.png")) == ("", None)


def test_building_the_page_looks_at_the_models_files_once(tmp_path: Path, monkeypatch) -> None:
    """Each form listed the models itself: every model's files were looked at twice at import (Hub models' too)."""
    studio, looks = Studio(tiny_settings(tmp_path)), []
    models = studio.models
    monkeypatch.setattr(studio, "models", lambda: looks.append(1) or models())
    demo = build_demo(studio)
    dropdowns = [block for block in demo.blocks.values() if isinstance(block, gr.Dropdown) and block.label == "Model"]
    assert len(looks) == 1 and len(dropdowns) == 2
    assert dropdowns[0].choices == dropdowns[1].choices and ("tiny-demo" in str(dropdowns[0].choices))
