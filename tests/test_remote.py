"""USE_LOCAL_MODELS=false against a small HTTP server on 127.0.0.1 that stands in for the Inference API."""

import base64
import dataclasses
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from dreamsketch.config import SettingsError
from dreamsketch.engine import GenerationError
from dreamsketch.gallery import meta_from_parameters, read_parameters
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import load_registry
from dreamsketch.request import RequestError
from dreamsketch.studio import Studio, choose_default_model
from tests.conftest import entry, write_registry
from tests.servers import running_server


class StandIn(BaseHTTPRequestHandler):
    requests: list[tuple[dict, dict]] = []
    status = 200
    size = (128, 128)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append((dict(self.headers), body))
        if StandIn.status != 200:
            self.send_response(StandIn.status)
            self.end_headers()
            return
        buffer = io.BytesIO()
        Image.new("RGB", StandIn.size, (10, 200, 30)).save(buffer, format="PNG")
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
    StandIn.size = (128, 128)
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


@pytest.mark.parametrize(
    ("status", "advice"), [(503, ""), (401, "; set HF_TOKEN to a token that may use it"), (403, "; set HF_TOKEN")]
)
def test_api_errors_are_reported_and_nothing_is_saved(remote_studio, status, advice):
    StandIn.status = status
    with pytest.raises(GenerationError) as error:
        remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1}, "txt2img"))
    assert str(error.value).startswith(f"the Inference API refused model 'tiny-demo' ({status}){advice}")
    assert remote_studio.gallery.count() == 0


def test_the_http_api_answers_502_when_the_inference_api_fails(remote_studio):
    StandIn.status = 500
    with running_server(remote_studio) as server:
        reply = httpx.post(f"{server.url}/api/txt2img", json={"prompt": "x", "seed": 1}, timeout=30)
    assert reply.status_code == 502
    assert reply.json() == {"status": "error", "error": "the Inference API refused model 'tiny-demo' (500)"}
    assert remote_studio.gallery.count() == 0


def test_a_model_left_to_the_service_records_no_sampler_name(remote_studio):
    result = remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1}, "txt2img"))
    assert "scheduler" not in StandIn.requests[0][1]["parameters"]
    assert result.entries[0].meta.scheduler == ""  # the service's own, which it does not name
    text = read_parameters(Image.open(remote_studio.gallery.folder / result.entries[0].file_name))
    assert text is not None and "Sampler" not in text and "Default" not in text
    assert meta_from_parameters(text) == result.entries[0].meta  # what an index rebuild reads back


def test_a_scheduler_is_sent_by_its_diffusers_class_and_recorded(remote_studio):
    result = remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1, "scheduler": "Euler a"}, "txt2img"))
    assert StandIn.requests[0][1]["parameters"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert result.entries[0].meta.scheduler == "Euler a"


@pytest.mark.parametrize(
    ("mode", "scheduler", "rule"),
    [
        ("txt2img", "DPM++ 2M Karras", "the Inference API takes only Euler a, Euler, DPM++ 2M, DDIM, UniPC, LMS, Heun"),
        ("img2img", "Euler", "the Inference API takes none for img2img (leave it Default)"),
    ],
)
def test_a_scheduler_the_service_cannot_honour_is_refused(remote_studio, mode, scheduler, rule):
    fields = {"prompt": "x", "seed": 1, "scheduler": scheduler}
    if mode == "img2img":
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
        fields["image"] = buffer.getvalue()
    with pytest.raises(RequestError, match=f"^field 'scheduler': {re.escape(rule)}"):
        remote_studio.generate(remote_studio.parse(fields, mode))
    assert StandIn.requests == [] and remote_studio.gallery.count() == 0


@pytest.mark.parametrize(
    ("own", "sent", "recorded"), [("Euler", "EulerDiscreteScheduler", "Euler"), ("DPM++ 2M Karras", None, "")]
)
def test_the_registry_scheduler_is_sent_where_the_service_takes_it(remote_studio, monkeypatch, own, sent, recorded):
    registry = remote_studio.engine.registry
    spec = dataclasses.replace(registry.get("tiny-demo"), scheduler=own)
    monkeypatch.setitem(registry.models, "tiny-demo", spec)
    result = remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1}, "txt2img"))
    assert StandIn.requests[0][1]["parameters"].get("scheduler") == sent
    assert result.entries[0].meta.scheduler == recorded


def test_a_picture_of_another_size_fails_and_nothing_is_saved(remote_studio):
    StandIn.size = (64, 64)
    request = remote_studio.parse({"prompt": "x", "seed": 1, "width": 128, "height": 64}, "txt2img")
    with pytest.raises(GenerationError, match="^the Inference API returned a 64x64 picture for a 128x64 request$"):
        remote_studio.generate(request)
    assert remote_studio.gallery.count() == 0


def test_an_unreachable_endpoint_is_reported(settings, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    url = f"http://127.0.0.1:{server.server_port}"
    server.server_close()  # nothing listens there now
    studio = Studio(dataclasses.replace(settings, use_local_models=False, inference_api_url=url))
    with pytest.raises(GenerationError, match="^the Inference API could not be reached \\(ConnectError\\)$"):
        studio.generate(studio.parse({"prompt": "x", "seed": 1}, "txt2img"))


@pytest.mark.parametrize(
    ("model_id", "source"),
    [("tiny-demo", "builtin:tiny"), ("a-folder", "./folder"), ("a-file", "folder/model.safetensors")],
)
def test_a_local_model_is_refused_before_any_network_work(settings, tmp_path, model_id, source):
    models_file = write_registry(tmp_path / "remote.yaml", [entry(model_id, source)])
    local = dataclasses.replace(settings, models_file=models_file, default_model=model_id, use_local_models=False)
    studio = Studio(local)
    message = re.escape(  # no server path in it: browser users see it
        f"model '{model_id}' is a local model and cannot run on the Inference API; "
        "set USE_LOCAL_MODELS=true or pick a Hub model"
    )
    with pytest.raises(ModelUnavailableError, match=f"^{message}$"):
        studio.generate(studio.parse({"prompt": "x", "model_id": model_id}, "txt2img"))
    with pytest.raises(ModelUnavailableError, match=f"^{message}$"):
        studio.engine.preload(model_id)


def test_a_model_the_service_cannot_run_is_one_line(remote_studio, monkeypatch):
    """huggingface_hub refuses a task the model's Hub page does not list with a ValueError (was a traceback)."""
    refusal = "Model 'a/b' doesn't support task 'image-to-image'. Supported tasks: 'text-to-image'."

    def refuse(*args, **kwargs):
        raise ValueError(refusal)

    monkeypatch.setattr(remote_studio.engine.client, "text_to_image", refuse)
    with pytest.raises(
        GenerationError, match=f"^the Inference API cannot run model 'tiny-demo': {re.escape(refusal)}$"
    ):
        remote_studio.generate(remote_studio.parse({"prompt": "x", "seed": 1}, "txt2img"))


def test_the_default_model_is_one_the_service_can_run(settings, tmp_path):
    models = [entry("tiny-demo", "builtin:tiny"), entry("hub-model", "org/model")]
    remote = dataclasses.replace(
        settings, models_file=write_registry(tmp_path / "both.yaml", models), default_model=None, use_local_models=False
    )
    assert choose_default_model(remote, load_registry(remote.models_file)) == "hub-model"
    own_endpoint = dataclasses.replace(remote, inference_api_url="http://127.0.0.1:9")
    assert choose_default_model(own_endpoint, load_registry(remote.models_file)) == "tiny-demo"
    local_only = dataclasses.replace(remote, models_file=write_registry(tmp_path / "local.yaml", models[:1]))
    with pytest.raises(SettingsError, match="USE_LOCAL_MODELS=false: no model in .* has a Hub repo id"):
        choose_default_model(local_only, load_registry(local_only.models_file))


def test_models_say_what_the_service_can_run(settings, tmp_path):
    """The local models were listed "ready offline" (and available) with USE_LOCAL_MODELS=false, then refused."""
    models = [entry("tiny-demo", "builtin:tiny"), entry("hub-model", "org/model")]
    remote = dataclasses.replace(
        settings, models_file=write_registry(tmp_path / "both.yaml", models), default_model=None, use_local_models=False
    )
    states = {m["id"]: (m["weights"], m["available"]) for m in Studio(remote).models()}
    assert states == {
        "tiny-demo": ("local only (USE_LOCAL_MODELS=true)", False),
        "hub-model": ("on the Inference API", True),
    }
    own_endpoint = Studio(dataclasses.replace(remote, inference_api_url="http://127.0.0.1:9"))
    assert {m["weights"] for m in own_endpoint.models()} == {"on your endpoint"}
