"""The HTTP API (DESIGN.md, "HTTP API") through a real uvicorn server on 127.0.0.1, offline, with tiny-demo."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from dreamsketch.api import MAX_BODY_BYTES, create_app
from dreamsketch.config import Settings
from dreamsketch.server import running_server
from dreamsketch.studio import Studio
from tests.servers import raw_get

FAST = {"model_id": "tiny-demo", "width": 128, "height": 128, "steps": 2}


def model_entry(model_id: str, source: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "name": model_id,
        "source": source,
        "family": "sd15",
        "width": 128,
        "height": 128,
        "steps": 4,
        "guidance_scale": 7.5,
    }


@dataclasses.dataclass
class Server:
    url: str
    studio: Studio

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def serve(studio: Studio) -> Iterator[Server]:
    """The HTTP API alone (no Gradio mounted) under uvicorn, on a free 127.0.0.1 port."""
    with running_server(create_app(studio)) as url:
        yield Server(url, studio)


@pytest.fixture(scope="module")
def settings_m(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("api")
    registry = root / "models.yaml"
    entries = [model_entry("tiny-demo", "builtin:tiny"), model_entry("uncached-hub", "nobody-here/not-cached")]
    registry.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return Settings(models_file=registry, output_dir=root / "outputs", default_model="tiny-demo")


@pytest.fixture(scope="module")
def server(settings_m: Settings) -> Iterator[Server]:
    yield from serve(Studio(settings_m))


@pytest.fixture(scope="module")
def auth_server(settings_m: Settings) -> Iterator[Server]:
    yield from serve(Studio(dataclasses.replace(settings_m, auth=("user", "pass"))))


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_bytes(size: tuple[int, int] = (96, 96), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and set(body) == {"status", "error"}, body
    for word in words:
        assert word in body["error"], body
    assert "Traceback" not in response.text and "detail" not in body


# ---------------------------------------------------------------------------------------------------------------
# Plain endpoints


@pytest.mark.parametrize("slash", ["", "/"])
def test_health_status_models_with_and_without_slash(client: httpx.Client, slash: str) -> None:
    assert client.get(f"/api/health{slash}").json() == {"status": "ok"}
    status = client.get(f"/api/status{slash}").json()
    assert status["device"] == "cpu" and status["gpu"] is None
    assert {"versions", "loaded_models", "compiling_models", "queue_length"} <= set(status)
    models = client.get(f"/api/models{slash}").json()
    assert models["status"] == "success"
    ids = {m["id"]: m for m in models["models"]}
    assert ids["tiny-demo"]["available"] is True and ids["uncached-hub"]["available"] is False
    assert {"id", "name", "family", "width", "height", "loaded", "available"} <= set(ids["tiny-demo"])


def test_openapi_lists_the_paths_and_docs_are_served(client: httpx.Client) -> None:
    spec = client.get("/api/openapi.json").json()
    assert {"/api/health", "/api/txt2img", "/api/img2img", "/api/results", "/media/generated/{file_name}"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/api/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["steps"]["maximum"] == 150
    assert body["properties"]["model_id"]["enum"][:2] == ["tiny-demo", "uncached-hub"]
    img2img = spec["paths"]["/api/img2img"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(img2img)
    responses = {
        (path, method): set(operation["responses"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    assert responses[("/api/health", "get")] == {"200"}
    assert responses[("/media/generated/{file_name}", "get")] == {"200", "404", "500"}  # no FastAPI 422
    assert responses[("/api/txt2img", "post")] == {"200", "400", "409", "413", "415", "500", "502", "503"}
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_unknown_paths_and_methods_answer_json(client: httpx.Client) -> None:
    assert_error(client.get("/api/nothing-here"), 404, "not found")
    assert_error(client.get("/media/other/x.png"), 404)
    response = client.post("/api/health")
    assert_error(response, 405)
    assert response.headers["allow"] == "GET, HEAD"
    assert_error(client.get("/api/txt2img"), 405)
    for method in ("TRACE", "FOO"):  # methods no route has
        response = client.request(method, "/api/status")
        assert_error(response, 405)
        assert response.headers["allow"] == "GET, HEAD"
        assert_error(client.request(method, "/media/nothing-here"), 404)
    assert client.get("/").status_code == 404  # "/" is left for the Gradio UI


def test_head_answers_where_get_does(client: httpx.Client) -> None:
    url = client.post("/api/txt2img", json=FAST).json()["result"]["url"]
    for path in ("/api/health", "/api/health/", "/api/results?limit=1", url):
        got, head = client.get(path), client.head(path)
        assert head.status_code == 200 and head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == str(len(got.content)), path
    assert client.head("/api/status").status_code == client.head("/api/models").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Generation


def test_txt2img_and_the_png_it_serves(server: Server, client: httpx.Client) -> None:
    response = client.post("/api/txt2img", json={**FAST, "prompt": "a red fox", "seed": 1234})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success" and "results" not in body and "warnings" not in body
    result = body["result"]
    assert set(result) == {
        "id",
        "url",
        "prompt",
        "created_at",
        "seed",
        "model_id",
        "width",
        "height",
        "steps",
        "guidance_scale",
    }
    assert result["seed"] == 1234 and result["prompt"] == "a red fox" and result["model_id"] == "tiny-demo"
    assert (result["width"], result["height"], result["steps"], result["guidance_scale"]) == (128, 128, 2, 7.5)
    assert result["created_at"].endswith("Z")
    assert result["url"].startswith(f"{server.url}/media/generated/") and result["url"].endswith(".png")
    png = httpx.get(result["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.size == (128, 128)
        assert "Seed: 1234" in image.info["parameters"] and image.info["parameters"].startswith("a red fox\n")


def test_batch_gives_consecutive_seeds_and_random_seed_is_returned(client: httpx.Client) -> None:
    body = client.post("/api/txt2img/", json={**FAST, "batch_size": 2, "seed": 77}).json()
    assert [r["seed"] for r in body["results"]] == [77, 78]
    assert body["result"] == body["results"][0]
    assert len({r["url"] for r in body["results"]}) == 2
    seed = client.post("/api/txt2img", json={**FAST, "seed": -1}).json()["result"]["seed"]
    assert 0 <= seed <= 2**32 - 1


def test_long_prompt_is_reported_as_a_warning(client: httpx.Client) -> None:
    body = client.post("/api/txt2img", json={**FAST, "prompt": "a small red fox " * 40}).json()
    assert body["status"] == "success" and body["warnings"] and "token" in body["warnings"][0]


def test_img2img_as_json_data_url_bare_base64_and_multipart(client: httpx.Client) -> None:
    fields = {**FAST, "prompt": "ink", "strength": 0.5, "seed": 5}
    for image in (data_url(png_bytes()), base64.b64encode(png_bytes(fmt="JPEG")).decode()):
        response = client.post("/api/img2img", json={**fields, "image": image})
        assert response.status_code == 200, response.text
        assert response.json()["result"]["seed"] == 5
    form = {key: str(value) for key, value in fields.items()} | {"scheduler": "Default"}  # a form cannot send null
    response = client.post(
        "/api/img2img/", data=form, files={"image": ("in.webp", png_bytes(fmt="WEBP"), "image/webp")}
    )
    assert response.status_code == 200, response.text
    url = response.json()["result"]["url"]
    with Image.open(io.BytesIO(httpx.get(url).content)) as image:
        assert "Denoising strength: 0.5" in image.info["parameters"]
        assert "Sampler: Euler a" in image.info["parameters"]  # tiny-demo's own


def test_form_numbers_as_forms_and_curl_users_write_them(client: httpx.Client) -> None:
    form = {"prompt": "ink", "steps": "+2", "strength": ".5", "guidance_scale": "7.", "seed": " 42 ", "width": "64"}
    form |= {"height": "64", "model_id": "tiny-demo"}
    response = client.post("/api/img2img", data=form, files={"image": ("in.png", png_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert (result["steps"], result["guidance_scale"], result["seed"]) == (2, 7.0, 42)


def test_urls_behind_a_proxy_are_the_public_ones(client: httpx.Client) -> None:
    """On a Space the proxy ends TLS and forwards the public host: the picture's URL was http:// at the inner host."""
    proxy = {"x-forwarded-proto": "https", "x-forwarded-host": "someone-dreamsketch.hf.space"}
    result = client.post("/api/txt2img", json=FAST, headers=proxy).json()["result"]
    assert result["url"].startswith("https://someone-dreamsketch.hf.space/media/generated/"), result["url"]
    listed = client.get("/api/results?limit=1", headers=proxy).json()["results"][0]
    assert listed["url"] == result["url"]
    assert client.get("/api/results?limit=1").json()["results"][0]["url"].startswith(str(client.base_url))
    for odd in (  # not an http(s) scheme or not a host[:port]: the server's own address is used instead
        {"x-forwarded-proto": "javascript", "x-forwarded-host": "evil.example/steal?x="},
        {"x-forwarded-proto": ",https", "x-forwarded-host": ", b.example"},
        {"x-forwarded-host": "good.example@evil.example"},
    ):
        url = client.get("/api/results?limit=1", headers=odd).json()["results"][0]["url"]
        assert url.startswith(f"{client.base_url}/media/generated/"), (odd, url)
    ipv6 = client.get("/api/results?limit=1", headers={"x-forwarded-host": "[::1]:9000, other"}).json()
    assert ipv6["results"][0]["url"].startswith("http://[::1]:9000/media/generated/")


def test_a_request_without_a_host_header_gets_the_servers_address(server: Server) -> None:
    """HTTP/1.0 without Host: the picture was saved, then the reply failed (500) building its URL."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        body = json.dumps(FAST).encode()
        conn.sendall(
            b"POST /api/txt2img HTTP/1.0\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert f'"url":"{server.url}/media/generated/'.encode() in reply.replace(b" ", b"")


def test_health_answers_during_a_generation(server: Server, client: httpx.Client) -> None:
    done = threading.Event()

    def generate() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as other:
            other.post("/api/txt2img", json={**FAST, "steps": 30})
        done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 30
    while server.studio.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert client.get("/api/health").json() == {"status": "ok"}
    assert time.monotonic() - started < 1.0 and not done.is_set()
    thread.join(120)


def test_more_generations_waiting_than_the_thread_pool_holds_leave_the_other_routes_working(
    settings_m: Settings, tmp_path
) -> None:
    """HTTP generations used to wait in the 40 threads of the sync routes: with DREAMSKETCH_QUEUE_SIZE above that,
    /api/status and /media stalled behind them, and further requests waited for a thread instead of hearing busy."""
    studio = Studio(dataclasses.replace(settings_m, queue_size=48, output_dir=tmp_path / "outputs"))
    waiting, replies = 45, []
    with running_server(create_app(studio)) as url:

        def generate(seed: int) -> None:
            replies.append(httpx.post(f"{url}/api/txt2img", json={**FAST, "seed": seed}, timeout=300).status_code)

        threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(waiting)]
        with studio.engine.lock:  # the device is busy
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while studio.pending < waiting and time.monotonic() < deadline:
                time.sleep(0.05)
            assert studio.pending == waiting
            assert httpx.get(f"{url}/api/status", timeout=30).json()["queue_length"] == waiting
        for thread in threads:
            thread.join(300)
    assert replies == [200] * waiting and studio.gallery.count() == waiting


# ---------------------------------------------------------------------------------------------------------------
# Results


def test_results_newest_first_and_limit(client: httpx.Client) -> None:
    newest = client.post("/api/txt2img", json={**FAST, "seed": 4242}).json()["result"]
    results = client.get("/api/results").json()["results"]
    assert results[0] == newest
    ids = [r["id"] for r in results]
    assert ids == sorted(ids, reverse=True) and len(results) <= 20
    assert len(client.get("/api/results/", params={"limit": 1}).json()["results"]) == 1
    assert client.get("/api/results?limit=100").status_code == 200
    for zeros in ("0", "0" * 4400):  # int() reads at most 4,300 digits: this was a 500
        assert len(client.get(f"/api/results?limit={zeros}1").json()["results"]) == 1
    for bad in ("0", "101", "abc", "-1", "1.5", "", " 5"):
        assert_error(client.get("/api/results", params={"limit": bad}), 400, "limit")
    assert_error(client.get("/api/results?limit=1&limit=2"), 400, "limit")


# ---------------------------------------------------------------------------------------------------------------
# Refusals: each answers the error JSON and writes nothing to the gallery

TRUNCATED_PNG = png_bytes()[:60]
REFUSED: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("malformed json", "/api/txt2img", {"content": b'{"prompt": ', "json_type": True}, 400, "body: not valid JSON"),
    ("empty body", "/api/txt2img", {"content": b"", "json_type": True}, 400, "not valid JSON"),
    ("json array", "/api/txt2img", {"json": [FAST]}, 400, "JSON object"),
    ("json string", "/api/txt2img", {"json": "hello"}, 400, "JSON object"),
    ("NaN literal", "/api/txt2img", {"content": b'{"guidance_scale": NaN}', "json_type": True}, 400, "JSON"),
    ("Infinity literal", "/api/txt2img", {"content": b'{"steps": Infinity}', "json_type": True}, 400, "JSON"),
    ("-Infinity literal", "/api/txt2img", {"content": b'{"seed": -Infinity}', "json_type": True}, 400, "JSON"),
    ("bad utf-8", "/api/txt2img", {"content": b'{"prompt": "\xff"}', "json_type": True}, 400, "JSON"),
    ("wrong content type", "/api/txt2img", {"content": b"prompt=x", "type": "text/plain"}, 415, "Content-Type"),
    ("form to txt2img", "/api/txt2img", {"data": {"prompt": "x"}}, 415, "application/json"),
    ("img2img text body", "/api/img2img", {"content": b"x", "type": "text/plain"}, 415, "multipart/form-data"),
    ("unknown field", "/api/txt2img", {"json": {"sampler": "Euler"}}, 400, "field 'sampler'"),
    ("image on txt2img", "/api/txt2img", {"json": {"image": "x"}}, 400, "field 'image'"),
    ("string for a number", "/api/txt2img", {"json": {"steps": "20"}}, 400, "field 'steps'"),
    ("bool for a number", "/api/txt2img", {"json": {"batch_size": True}}, 400, "field 'batch_size'"),
    ("number for prompt", "/api/txt2img", {"json": {"prompt": 5}}, 400, "field 'prompt'"),
    ("prompt too long", "/api/txt2img", {"json": {"prompt": "x" * 2001}}, 400, "field 'prompt'"),
    ("negative too long", "/api/txt2img", {"json": {"negative_prompt": "x" * 2001}}, 400, "field 'negative_prompt'"),
    ("control character", "/api/txt2img", {"json": {"prompt": "a\x00b"}}, 400, "field 'prompt'"),
    ("width not /8", "/api/txt2img", {"json": {"width": 500}}, 400, "field 'width': must be a multiple of 8"),
    ("width small", "/api/txt2img", {"json": {"width": 56}}, 400, "field 'width'"),
    ("height big", "/api/txt2img", {"json": {"height": 2056}}, 400, "field 'height'"),
    ("area", "/api/txt2img", {"json": {"width": 512, "height": 512}}, 400, "native area"),
    ("area by height", "/api/txt2img", {"json": {"width": 64, "height": 1032}}, 400, "field 'height': width*height"),
    (
        "steps of 5,000 digits",
        "/api/txt2img",
        {"content": b'{"steps": ' + b"9" * 5000 + b"}", "json_type": True},
        400,
        "field 'steps'",
    ),
    ("steps 0", "/api/txt2img", {"json": {"steps": 0}}, 400, "field 'steps'"),
    ("steps 151", "/api/txt2img", {"json": {"steps": 151}}, 400, "field 'steps'"),
    ("guidance -1", "/api/txt2img", {"json": {"guidance_scale": -1}}, 400, "field 'guidance_scale'"),
    ("guidance 31", "/api/txt2img", {"json": {"guidance_scale": 30.5}}, 400, "field 'guidance_scale'"),
    ("guidance 1e400", "/api/txt2img", {"content": b'{"guidance_scale": 1e400}', "json_type": True}, 400, "guidance"),
    ("seed -2", "/api/txt2img", {"json": {"seed": -2}}, 400, "field 'seed'"),
    ("seed 2^32", "/api/txt2img", {"json": {"seed": 2**32}}, 400, "field 'seed'"),
    ("seed huge", "/api/txt2img", {"json": {"seed": 10**40}}, 400, "field 'seed'"),
    ("scheduler", "/api/txt2img", {"json": {"scheduler": "Fancy"}}, 400, "field 'scheduler'"),
    ("batch 0", "/api/txt2img", {"json": {"batch_size": 0}}, 400, "field 'batch_size'"),
    ("batch 9", "/api/txt2img", {"json": {"batch_size": 9}}, 400, "field 'batch_size'"),
    ("unknown model", "/api/txt2img", {"json": {"model_id": "nope"}}, 400, "field 'model_id'"),
    ("strength 0", "/api/img2img", {"json": {"strength": 0, "image": data_url(png_bytes())}}, 400, "'strength'"),
    ("strength 1.5", "/api/img2img", {"json": {"strength": 1.5, "image": data_url(png_bytes())}}, 400, "'strength'"),
    ("strength on txt2img", "/api/txt2img", {"json": {"strength": 0.5}}, 400, "field 'strength'"),
    ("no image", "/api/img2img", {"json": {"prompt": "x"}}, 400, "field 'image'"),
    ("image number", "/api/img2img", {"json": {"image": 5}}, 400, "field 'image'"),
    ("bad base64", "/api/img2img", {"json": {"image": "data:image/png;base64,@@@"}}, 400, "field 'image'"),
    ("not base64 data url", "/api/img2img", {"json": {"image": "data:image/png,abc"}}, 400, "field 'image'"),
    ("non-image data url", "/api/img2img", {"json": {"image": data_url(b"hello")}}, 400, "field 'image'"),
    ("empty data url", "/api/img2img", {"json": {"image": "data:image/png;base64,"}}, 400, "field 'image'"),
    ("non-image upload", "/api/img2img", {"files": {"image": ("a.png", b"GIF89a....")}}, 400, "field 'image'"),
    ("zero-byte upload", "/api/img2img", {"files": {"image": ("a.png", b"")}}, 400, "field 'image'"),
    ("truncated png", "/api/img2img", {"files": {"image": ("a.png", TRUNCATED_PNG)}}, 400, "field 'image'"),
    (
        "form bad number",
        "/api/img2img",
        {"data": {"steps": "abc"}, "files": {"image": ("a.png", png_bytes())}},
        400,
        "field 'steps'",
    ),
    *[  # Python's int() would take the first four
        (
            f"form number {name}",
            "/api/img2img",
            {"data": {"seed": text}, "files": {"image": ("a.png", png_bytes())}},
            400,
            f"field 'seed': must be a number (got {text[:40]!r})",
        )
        for name, text in (
            ("4_2", "4_2"),
            ("fullwidth 1", "\uff11"),
            ("0x10", "0x10"),
            ("5000 digits", "1" * 5000),
        )
    ],
    (
        "form nan",
        "/api/img2img",
        {"data": {"strength": "nan"}, "files": {"image": ("a.png", png_bytes())}},
        400,
        "field 'strength'",
    ),
    (
        "form unknown field",
        "/api/img2img",
        {"data": {"colour": "red"}, "files": {"image": ("a.png", png_bytes())}},
        400,
        "field 'colour'",
    ),
    (
        "form file for a field",
        "/api/img2img",
        {"files": {"image": ("a.png", png_bytes()), "steps": ("s", b"2")}},
        400,
        "field 'steps'",
    ),
    ("form no image", "/api/img2img", {"data": {"prompt": "x"}, "files": {"other": ("a", b"")}}, 400, "field"),
    ("multipart no boundary", "/api/img2img", {"content": b"x", "type": "multipart/form-data"}, 400, "multipart"),
    ("multipart garbage", "/api/img2img", {"content": b"x", "type": "multipart/form-data; boundary=zz"}, 400, "body"),
]


def send(client: httpx.Client, path: str, spec: dict[str, Any]) -> httpx.Response:
    spec = dict(spec)
    headers = {}
    if spec.pop("json_type", False):
        headers["content-type"] = "application/json"
    if "type" in spec:
        headers["content-type"] = spec.pop("type")
    return client.post(path, headers=headers, **spec)


@pytest.mark.parametrize(
    ("path", "spec", "status", "words"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused_requests_answer_the_error_json_and_write_nothing(
    server: Server, client: httpx.Client, path: str, spec: dict[str, Any], status: int, words: str
) -> None:
    before = server.studio.gallery.count()
    assert_error(send(client, path, spec), status, words)
    assert server.studio.gallery.count() == before


def test_uncached_hub_model_is_503_with_the_offline_message(server: Server, client: httpx.Client) -> None:
    before = server.studio.gallery.count()
    response = client.post("/api/txt2img", json={**FAST, "model_id": "uncached-hub"})
    assert_error(response, 503, "uncached-hub", "tiny-demo")
    assert server.studio.gallery.count() == before


def huge_request(server: Server, head: bytes, chunks: int = 0) -> tuple[int, bytes]:
    """Send a request head (and `chunks` chunks of 1 MiB, chunked encoding); return the status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head)
        block = b"x" * (1024 * 1024)
        for _ in range(chunks):
            sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


def test_huge_bodies_are_refused_with_413(server: Server) -> None:
    before = server.studio.gallery.count()
    big = MAX_BODY_BYTES + 1
    head = (
        f"POST /api/img2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {big}\r\n\r\n"
    ).encode()
    status, body = huge_request(server, head)
    assert status == 413 and b'"status":"error"' in body and b"limit" in body
    chunked = (
        b"POST /api/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, body = huge_request(server, chunked, chunks=MAX_BODY_BYTES // (1024 * 1024) + 1)
    assert status == 413 and b"limit" in body
    assert server.studio.gallery.count() == before


# ---------------------------------------------------------------------------------------------------------------
# /media serves gallery PNGs and nothing else


def test_media_refuses_everything_but_gallery_pngs(server: Server, client: httpx.Client) -> None:
    folder = server.studio.gallery.folder
    (folder / "20260101-000000-1-stranger.png").write_bytes(png_bytes())  # a PNG not in the index
    (folder / "notes.txt").write_text("secret")
    attempts = [
        "/media/generated/../gallery.sqlite3",
        "/media/generated/..%2fgallery.sqlite3",
        "/media/generated/%2e%2e%2fgallery.sqlite3",
        "/media/generated/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/media/generated/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/media/generated/%2fetc%2fpasswd",
        "/media/generated//etc/passwd",
        "/media/generated/gallery.sqlite3",
        "/media/generated/gallery.sqlite3-wal",
        "/media/generated/notes.txt",
        "/media/generated/20260101-000000-1-stranger.png",
        "/media/generated/x.png%00.txt",
        "/media/generated/%00",
        "/media/generated/.tmp-abc.png",
        "/media/generated/",
        "/media/generated/nothing.png",
        "/media/generated/C:%5cWindows%5cwin.ini",
    ]
    for path in attempts:
        status, body = raw_get(server.url, path)
        assert status == 404, (path, body)
        assert b'"status":"error"' in body and b"secret" not in body and b"SQLite" not in body, path
    url = client.post("/api/txt2img", json=FAST).json()["result"]["url"]
    for variant in (url, url + "/"):
        assert client.get(variant).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Auth


def test_auth_protects_every_api_and_media_route(auth_server: Server, server: Server, client: httpx.Client) -> None:
    url = client.post("/api/txt2img", json=FAST).json()["result"]["url"]
    media_path = url.removeprefix(server.url)  # the same gallery folder backs both servers
    paths = [
        "/api/health",
        "/api/health/",
        "/api/status",
        "/api/models",
        "/api/results",
        "/api/openapi.json",
        "/api/docs",
        "/api/nothing",
        media_path,
    ]
    with httpx.Client(base_url=auth_server.url, timeout=30) as anonymous:
        for path in paths:
            response = anonymous.get(path)
            assert_error(response, 401, "authentication")
            assert response.headers["www-authenticate"].startswith("Basic")
            assert_error(anonymous.get(path, auth=("user", "wrong")), 401)
            assert_error(anonymous.get(path, auth=("pass", "user")), 401)
            assert_error(anonymous.get(path, headers={"Authorization": "Basic %%%"}), 401)
        assert_error(anonymous.post("/api/txt2img", json=FAST), 401)
        assert "pass" not in anonymous.get("/api/status").text
    with httpx.Client(base_url=auth_server.url, timeout=30, auth=("user", "pass")) as user:
        for path in paths[:-2]:
            assert user.get(path).status_code == 200, path
        assert user.get(media_path).status_code == 200
        assert_error(user.get("/api/nothing"), 404)
        spec = user.get("/api/openapi.json").json()
        assert "HTTPBasic" in spec["components"]["securitySchemes"]


def test_no_cors_headers(client: httpx.Client) -> None:
    response = client.get("/api/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/api/txt2img", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
