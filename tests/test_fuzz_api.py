"""The HTTP API fuzzed from its own OpenAPI document (schemathesis) against the real server on 127.0.0.1.

Valid and invalid cases for every operation: each answers 2xx, or 4xx with {"status": "error", "error": ...};
never a 5xx, never a traceback, and a refused request never writes to the gallery. The positive-data check is left
out on purpose: rules such as "width*height at most 4x the native area" are described, not expressible, in the
schema. Generation cost is kept small by lowering valid steps, sizes and batch sizes in a map_body hook (values
outside the bounds are left as generated, so that invalid cases stay invalid)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from dreamsketch.studio import Studio
from tests.servers import RunningServer, running_server, tiny_settings

CHEAP = {"steps": (2, 150), "batch_size": (1, 8), "width": (64, 2048), "height": (64, 2048)}
EXAMPLES = 30
TIMEOUT_S = 60  # generations queue behind each other on a CPU


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("fuzz")
    model = {"id": "tiny-demo", "name": "Tiny demo (noise)", "source": "builtin:tiny", "family": "sd15"}
    model |= {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}
    (folder / "models.yaml").write_text(yaml.safe_dump([model]), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~30 tiny generations: one thread each is fastest, above all on a shared CPU
    try:
        with running_server(Studio(tiny_settings(folder))) as server:
            yield server
    finally:
        torch.set_num_threads(threads)


def lower_cost(body: Any) -> Any:
    """Valid steps/batch/size lowered to cheap ones; anything else (invalid values, non-objects) left alone."""
    if not isinstance(body, dict):
        return body
    lowered = dict(body)
    for name, (cheap, high) in CHEAP.items():
        value = lowered.get(name)
        if type(value) is int and cheap < value <= high:
            lowered[name] = cheap
    return lowered


OPERATIONS = [
    ("GET", "/api/health"),
    ("GET", "/api/status"),
    ("GET", "/api/models"),
    ("GET", "/api/results"),
    ("GET", "/media/generated/{file_name}"),
    ("POST", "/api/txt2img"),
    ("POST", "/api/img2img"),
]
WITH_INPUT = {"/api/results", "/api/txt2img", "/api/img2img"}  # a free-form string path parameter has no invalid value
# Positive cases: the bounds not in the schema may refuse them. Negative-data rejection is judged on negative cases
# only (schemathesis also flags positive multipart cases whose serialised form it cannot match to the schema).
EXCLUDED = {
    GenerationMode.POSITIVE: [positive_data_acceptance, negative_data_rejection],
    GenerationMode.NEGATIVE: [positive_data_acceptance],
}
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or path in WITH_INPUT  # no invalid case exists for an operation without input
]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/api/openapi.json", timeout=TIMEOUT_S)


def test_the_fuzz_covers_every_operation_of_the_schema(api_schema: Any) -> None:
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_generated_case_is_answered_without_a_server_error(
    api_schema: Any, fuzz_server: RunningServer, method: str, path: str, mode: GenerationMode
) -> None:
    gallery = fuzz_server.studio.gallery
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @given(strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        case.body = lower_cost(case.body)
        before = gallery.count()
        response = case.call(timeout=TIMEOUT_S)
        # In a multipart form every value is text: a "number" for the prompt is a valid prompt once sent.
        as_text = [negative_data_rejection] if case.media_type == "multipart/form-data" else []
        case.validate_response(response, excluded_checks=EXCLUDED[mode] + as_text)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        assert "Traceback" not in response.text
        if response.status_code >= 400:
            body = response.json()
            assert body["status"] == "error" and isinstance(body["error"], str) and body["error"], body
            assert gallery.count() == before, "a refused request wrote to the gallery"

    check()
