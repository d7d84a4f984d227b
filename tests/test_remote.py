"""USE_LOCAL_MODELS=false against a small HTTP server on 127.0.0.1 that stands in for the Inference API."""

import base64
import dataclasses
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from dreamsketch.engine import GenerationError
from dreamsketch.gallery import read_parameters
from dreamsketch.studio import Studio


class StandIn(BaseHTTPRequestHandler):
    requests: list[tuple[dict, dict]] = []
    status = 200

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append((dict(self.headers), body))
        if StandIn.status != 200:
            self.send_response(StandIn.status)
            self.end_headers()
            return
        buffer = io.BytesIO()
        Image.new("RGB", (128, 128), (10, 200, 30)).save(buffer, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    def log_message(self, *args):
        pass


@pytest.fixture
def remote_studio(settings, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the stand-in is on 127.0.0.1
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandIn.requests.clear()
    StandIn.status = 200
    url = f"http://127.0.0.1:{server.server_port}"
    yield Studio(dataclasses.replace(settings, use_local_models=False, inference_api_url=url, hf_token="hf_test"))
    server.shutdown()
    server.server_close()


def test_txt2img_goes_through_the_inference_api_into_the_gallery(remote_studio):
    request = remote_studio.parse({"prompt": "a fox", "seed": 5, "batch_size": 2, "steps": 9}, "txt2img")
    steps = []
    result = remote_studio.generate(request, on_step=lambda s: steps.append((s.step, s.total, s.preview())))
    assert steps == [(1, 2, None), (2, 2, None)]
    assert [e.meta.seed for e in result.entries] == [5, 6] and remote_studio.gallery.count() == 2
    headers, body = StandIn.requests[0]
    assert headers["authorization"] == "Bearer hf_test"
    assert body == {
        "inputs": "a fox",
        "parameters": {"height": 128, "width": 128, "num_inference_steps": 9, "guidance_scale": 7.5, "seed": 5},
    }
    assert StandIn.requests[1][1]["parameters"]["seed"] == 6
    parameters = read_parameters(Image.open(remote_studio.gallery.folder / result.entries[0].file_name))
    assert "Seed: 5" in parameters and "Model: tiny-demo" in parameters and "hf_test" not in parameters


def test_img2img_sends_the_image_and_strength(remote_studio):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    fields = {"prompt": "sea", "image": buffer.getvalue(), "strength": 0.4, "seed": 1}
    result = remote_studio.generate(remote_studio.parse(fields, "img2img"))
    body = StandIn.requests[0][1]
    assert body["parameters"]["strength"] == 0.4 and body["parameters"]["prompt"] == "sea"
    assert Image.open(io.BytesIO(base64.b64decode(body["inputs"]))).size == (128, 128)
    assert result.entries[0].meta.strength == 0.4


def test_api_errors_are_reported_and_nothing_is_saved(remote_studio):
    StandIn.status = 503
    with pytest.raises(GenerationError, match="the Inference API refused model 'tiny-demo' \\(503\\)"):
        remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1}, "txt2img"))
    assert remote_studio.gallery.count() == 0
