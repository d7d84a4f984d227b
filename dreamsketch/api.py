"""The original DreamSketch HTTP API (DESIGN.md, "HTTP API"): routes under /api and /media on the root FastAPI app.

This module only translates HTTP to and from the studio: every field is checked by `Studio.parse`, never by
pydantic. Replies are `{"status": "success", ...}` or `{"status": "error", "error": "<message>"}`; a traceback
never leaves the server. The Gradio UI is mounted onto the same app at "/" (after these routes, so they win).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import html
import json
import logging
import math
import re
import secrets
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBasic
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.routing import Match, Route, request_response
from starlette.types import Receive, Scope, Send

from dreamsketch import __version__
from dreamsketch.engine import GenerationCancelled, GenerationError
from dreamsketch.gallery import GalleryEntry, GalleryError
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.remote import InferenceApiError
from dreamsketch.request import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    Mode,
    RequestError,
    decode_image,
)
from dreamsketch.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from dreamsketch.studio import Studio, StudioBusy

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 30 * 1024 * 1024
RESULTS_DEFAULT, RESULTS_MAX = 20, 100
API_PREFIXES = ("/api", "/media")
INT_FIELDS = ("width", "height", "steps", "seed", "batch_size")
FLOAT_FIELDS = ("guidance_scale", "strength")
INTERNAL_ERROR = "internal server error; the details are in the server log"
MIN_SCRUBBED_CHARS = 4
RESULT_KEYS = ("id", "prompt", "created_at", "seed", "model_id", "width", "height", "steps", "guidance_scale")
_DIGITS = re.compile(r"[0-9]{1,6}")
_HOST = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")  # a name, IPv4 or [IPv6], and a port
_INTEGER = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")  # as HTML forms and curl users write
_NO_CONTROL = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f]*$"

# Shown until the Swagger UI's script (loaded just before it) turns out to be there.
OFFLINE_DOCS_NOTE = """
<div id="offline-docs-note" style="font-family: sans-serif; margin: 2em">
  <p>The interactive docs need the Swagger UI's scripts from cdn.jsdelivr.net, which did not load (is this machine
  offline?).</p>
  <p>The API is described in <a href="{spec}">/api/openapi.json</a>; the app's Docs tab has examples for curl and
  gradio_client.</p>
</div>
<script>if (window.SwaggerUIBundle) document.getElementById("offline-docs-note").remove();</script>
"""

# Exceptions of the studio and what HTTP status each becomes (first match wins).
STATUS_FOR: tuple[tuple[type[Exception], int], ...] = (
    (RequestError, 400),
    (ModelUnavailableError, 503),
    (StudioBusy, 503),
    (GenerationCancelled, 409),
    (InferenceApiError, 502),
    (GenerationError, 500),
    (GalleryError, 500),
)


class ApiError(Exception):
    """An HTTP-level refusal (bad body, wrong content type, too large, no credentials)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_reply(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message}, status_code=status, headers=headers)


def create_app(studio: Studio) -> FastAPI:
    """The root app: the HTTP API under /api and /media. Mount the Gradio UI onto it at "/" afterwards."""
    app = FastAPI(
        title="DreamSketch API",
        version=__version__,
        description='Text-to-image and image-to-image over HTTP. Errors: {"status": "error", "error": "..."}.',
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    routes = _Routes(app, studio)
    routes.register()
    _add_exception_handlers(app, studio)
    return app


# ---------------------------------------------------------------------------------------------------------------
# Routes


class _Routes:
    def __init__(self, app: FastAPI, studio: Studio) -> None:
        self.app = app
        self.studio = studio
        self.dependencies = _auth_dependencies(studio.settings.auth)
        # Generations wait in threads of their own: in the pool shared with the other routes, more than its 40
        # would have stalled every sync route and waited for a thread instead of hearing "busy".
        self.generation_threads = anyio.CapacityLimiter(math.inf)

    def register(self) -> None:
        self._add("/api/health", self.health, "GET", schema=ok_schema())
        self._add("/api/status", self.status, "GET", schema=object_schema(), errors=(500,))
        self._add("/api/models", self.models, "GET", schema=object_schema(), errors=(500,))
        for mode, endpoint, body in (("txt2img", self.txt2img, txt2img_body), ("img2img", self.img2img, img2img_body)):
            self._add(
                f"/api/{mode}",
                endpoint,
                "POST",
                schema=generation_schema(),
                body=body(self.studio),
                errors=GENERATION_ERRORS,
            )
        results = results_parameters()
        self._add("/api/results", self.results, "GET", schema=object_schema(), extra=results, errors=(400, 500))
        media: dict[str, Any] = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
        media_path = "/media/generated/{file_name}"
        self._add(
            media_path,
            self.media,
            "GET",
            response=media,
            extra=file_name_parameter(),
            errors=(404, 500),
            name="media_file",
        )
        self._add("/api/openapi.json", self.openapi, "GET", in_schema=False)
        self._add("/api/docs", self.docs, "GET", in_schema=False)
        for path in ("/api", "/api/{rest:path}", "/media", "/media/{rest:path}"):
            self.app.router.routes.append(Route(path, EveryMethod(self.not_found), include_in_schema=False))

    def _add(
        self,
        path: str,
        endpoint: Callable[..., Any],
        method: str,
        *,
        schema: dict[str, Any] | None = None,
        response: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        errors: tuple[int, ...] = (),
        name: str | None = None,
        in_schema: bool = True,
    ) -> None:
        """Register `path` and `path/` (the slash variant left out of the OpenAPI document), and for a GET also
        HEAD (left out too). `errors`: the error statuses the endpoint answers with."""
        ok = response or {"content": {"application/json": {"schema": schema or {}}}}
        openapi_extra = {**(extra or {}), **({"requestBody": body} if body else {})}
        errors += (401,) if self.dependencies else ()
        variants = [(path, [method], in_schema), (path + "/", [method], False)]
        if method == "GET":
            variants += [(path, ["HEAD"], False), (path + "/", ["HEAD"], False)]
        for variant, methods, published in variants:
            self.app.add_api_route(
                variant,
                endpoint,
                methods=methods,
                name=name if (variant, methods) == (path, [method]) else None,
                include_in_schema=published,
                dependencies=self.dependencies,
                responses={200: ok, **error_responses(errors)},
                openapi_extra=openapi_extra or None,
            )

    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def status(self) -> JSONResponse:
        return JSONResponse({"status": "success", **self.studio.status()})

    def models(self) -> JSONResponse:
        return JSONResponse({"status": "success", "models": self.studio.models()})

    async def txt2img(self, request: Request) -> JSONResponse:
        if media_type(request) != "json":
            raise ApiError(415, "body: Content-Type must be application/json")
        fields = parse_json(await read_body(request))
        return await self._generate(request, fields, "txt2img")

    async def img2img(self, request: Request) -> JSONResponse:
        kind = media_type(request)
        if kind == "json":
            fields = parse_json(await read_body(request))
            if fields.get("image") is not None:
                fields["image"] = decode_image(fields["image"])
        elif kind == "multipart":
            fields = await parse_form(request, await read_body(request))
        else:
            raise ApiError(415, "body: Content-Type must be multipart/form-data or application/json")
        return await self._generate(request, fields, "img2img")

    async def _generate(self, request: Request, fields: dict[str, Any], mode: Mode) -> JSONResponse:
        parsed = await run_in_threadpool(self.studio.parse, fields, mode)
        cancel = threading.Event()
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, cancel))
        try:
            result = await anyio.to_thread.run_sync(
                self.studio.generate, parsed, None, cancel, limiter=self.generation_threads
            )
        finally:
            watcher.cancel()
        results = [result_item(request, entry) for entry in result.entries]
        reply: dict[str, Any] = {"status": "success", "result": results[0]}
        if len(results) > 1:
            reply["results"] = results
        if result.warnings:
            reply["warnings"] = result.warnings
        return JSONResponse(reply)

    def results(self, request: Request) -> JSONResponse:
        limit = results_limit(request.query_params.getlist("limit"))
        entries = self.studio.gallery.list(limit=limit)
        return JSONResponse({"status": "success", "results": [result_item(request, entry) for entry in entries]})

    def media(self, request: Request) -> FileResponse:
        path = self.studio.gallery.file_path(request.path_params["file_name"])
        if path is None:
            raise ApiError(404, "not found")
        return FileResponse(path, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})

    async def openapi(self) -> JSONResponse:
        return JSONResponse(self.app.openapi())

    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI, whose scripts come from a CDN; a machine without the internet gets a note instead."""
        spec = f"{request.scope.get('root_path', '')}/api/openapi.json"
        page = bytes(get_swagger_ui_html(openapi_url=spec, title="DreamSketch API").body).decode()
        note = OFFLINE_DOCS_NOTE.format(spec=html.escape(spec))
        return HTMLResponse(page.replace("</body>", f"{note}</body>"))

    async def not_found(self, request: Request) -> Response:
        """Any other /api or /media path or method: 405 where another method would match, else 404 (never
        Gradio's)."""
        if self.studio.settings.auth is not None:
            require_auth(request, self.studio.settings.auth)
        allowed: set[str] = set()
        for route in self.app.router.routes:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                allowed |= getattr(route, "methods", None) or set()
        if allowed:
            return error_reply(405, "method not allowed", {"Allow": ", ".join(sorted(allowed))})
        return error_reply(404, "not found")


class EveryMethod:
    """A request-response endpoint as an ASGI app, which a route answers for every method, unknown ones too
    (Starlette routes a plain function for GET and HEAD only, and Gradio's app below would answer the rest)."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# Requests: body, JSON, form, image, query


def media_type(request: Request) -> str:
    """The body's kind: "json", "multipart", or else the bare media type of the Content-Type header."""
    value = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if value == "application/json" or (value.startswith("application/") and value.endswith("+json")):
        return "json"
    return "multipart" if value == "multipart/form-data" else value


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (by Content-Length first, then by counting)."""
    too_large = ApiError(413, f"body: larger than the {MAX_BODY_BYTES // (1024 * 1024)} MB limit")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _whole_number(text: str) -> int | float:
    """A JSON integer; one of more digits than int() reads (4,300) as the infinity it is near, which the request's
    checks refuse by field, as they refuse 1e400."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object; NaN/Infinity literals, bad UTF-8 and other non-JSON are refused."""
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_int=_whole_number)
    except (ValueError, RecursionError):
        raise ApiError(400, "body: not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "body: must be a JSON object of request fields")
    return value


async def parse_form(request: Request, body: bytes) -> dict[str, Any]:
    """Multipart fields: numbers converted from text, the `image` file read into bytes."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(
            max_files=4, max_fields=64, max_part_size=MAX_BODY_BYTES
        ) as form:
            fields: dict[str, Any] = {}
            for name in form:
                values = form.getlist(name)
                if len(values) > 1:
                    raise RequestError(name, "given more than once")
                fields[name] = await form_value(name, values[0])
    except (StarletteHTTPException, MultiPartException, UnicodeDecodeError) as error:
        detail = getattr(error, "detail", None) or getattr(error, "message", None) or "unreadable"
        raise ApiError(400, f"body: not valid multipart form data ({detail})") from None
    return fields


async def form_value(name: str, value: str | UploadFile) -> Any:
    if isinstance(value, UploadFile):
        if name != "image":
            raise RequestError(name, "must be a plain form field, not a file")
        return await value.read()
    if name == "image":
        return decode_image(value)
    if name in INT_FIELDS or name in FLOAT_FIELDS:
        return form_number(name, value)
    return value


def form_number(name: str, text: str) -> int | float | None:
    """A form field's number in plain decimal digits (an int where it is one); empty means "use the default"."""
    text = text.strip()
    if not text:
        return None
    with contextlib.suppress(ValueError):  # int() refuses more than 4,300 digits
        if _NUMBER.fullmatch(text):
            return int(text) if _INTEGER.fullmatch(text) else float(text)
    raise RequestError(name, f"must be a number (got {text[:40]!r})")


def results_limit(values: list[str]) -> int:
    if not values:
        return RESULTS_DEFAULT
    digits = values[0].lstrip("0") or values[0][:1]  # "007" is 7 however many zeros lead it; "000" is 0
    if len(values) > 1 or not _DIGITS.fullmatch(digits) or not 1 <= int(digits) <= RESULTS_MAX:
        raise ApiError(400, f"query 'limit': must be a whole number from 1 to {RESULTS_MAX}")
    return int(digits)


async def cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Cancel the generation when its client goes away (frees the device for others)."""
    with contextlib.suppress(Exception):
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        cancel.set()


# ---------------------------------------------------------------------------------------------------------------
# Replies


def result_item(request: Request, entry: GalleryEntry) -> dict[str, Any]:
    flat = entry.to_dict()
    served = origin(request.headers, request.url.scheme, request.url.netloc)
    url = served + request.url_for("media_file", file_name=entry.file_name).path
    return {"id": flat["id"], "url": url, **{key: flat[key] for key in RESULT_KEYS[1:]}}


def origin(headers: Mapping[str, str], scheme: str, host: str) -> str:
    """scheme://host as the client reached the server (`scheme` and `host`, from its socket, where the request names
    no Host): behind a proxy such as Spaces' (which ends TLS), the ones it forwarded, if they are an http(s) scheme
    and a host[:port]. A client that forwards others itself only changes the addresses in its own replies."""
    forwarded_scheme = _first(headers.get("x-forwarded-proto")).lower()
    forwarded_host = _first(headers.get("x-forwarded-host")) or _first(headers.get("host"))
    scheme = forwarded_scheme if forwarded_scheme in ("http", "https") else scheme
    host = forwarded_host if _HOST.fullmatch(forwarded_host) else host
    return f"{scheme}://{host}"


def _first(value: str | None) -> str:
    """The first value of a header that a chain of proxies may have made a list."""
    return (value or "").split(",")[0].strip()


def _auth_dependencies(auth: tuple[str, str] | None) -> list[Any]:
    """Basic auth on every route when DREAMSKETCH_AUTH is set (HTTPBasic also puts the scheme in OpenAPI)."""
    if auth is None:
        return []
    basic = HTTPBasic(auto_error=False, realm="DreamSketch")

    async def check(request: Request) -> None:
        require_auth(request, auth)

    return [Depends(basic), Depends(check)]


def require_auth(request: Request, auth: tuple[str, str]) -> None:
    if not basic_auth_ok(request.headers.get("authorization"), auth):
        raise ApiError(401, "authentication required", {"WWW-Authenticate": 'Basic realm="DreamSketch"'})


def basic_auth_ok(authorization: str | None, auth: tuple[str, str]) -> bool:
    """Whether an Authorization header carries the DREAMSKETCH_AUTH user and password (compared in constant time)."""
    scheme, _, encoded = (authorization or "").partition(" ")
    try:
        given = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        given = ""
    user, _, password = given.partition(":")
    user_ok = secrets.compare_digest(user.encode(), auth[0].encode())
    password_ok = secrets.compare_digest(password.encode(), auth[1].encode())
    return scheme.lower() == "basic" and user_ok and password_ok


def _add_exception_handlers(app: FastAPI, studio: Studio) -> None:
    # The token and the password, not the user name: scrubbing a name such as "demo" garbled "tiny-demo" in messages
    # (and showed which letters the secret has); so too a secret of a letter or two, which messages hold by chance.
    password = studio.settings.auth[1] if studio.settings.auth else None
    secret_values = [s for s in (studio.settings.hf_token, password) if s and len(s) >= MIN_SCRUBBED_CHARS]

    def scrub(message: str) -> str:
        for secret in secret_values:
            message = message.replace(secret, "***")
        return message

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_reply(exc.status, scrub(exc.message), exc.headers)

    async def studio_error(request: Request, exc: Exception) -> Response:
        status = next(code for kind, code in STATUS_FOR if isinstance(exc, kind))
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "5"} if isinstance(exc, StudioBusy) else None
        return error_reply(status, scrub(str(exc) or "generation cancelled"), headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_reply(exc.status_code, scrub(message), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        return error_reply(400, "request not valid")

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_reply(500, INTERNAL_ERROR)

    app.add_exception_handler(ApiError, api_error)
    for kind, _ in STATUS_FOR:
        app.add_exception_handler(kind, studio_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


# ---------------------------------------------------------------------------------------------------------------
# OpenAPI: the request fields and their bounds (the server checks them in Studio.parse, not from this schema)


def field_schemas(studio: Studio, nullable: bool = True) -> dict[str, dict[str, Any]]:
    def kind(name: str) -> str | list[str]:
        return [name, "null"] if nullable else name

    def whole(low: int, high: int, **more: Any) -> dict[str, Any]:
        return {"type": kind("integer"), "minimum": low, "maximum": high, **more}

    text = {"type": kind("string"), "maxLength": MAX_PROMPT_CHARS, "pattern": _NO_CONTROL}
    none = [None] if nullable else []
    area = "width*height at most 4x the model's native area"
    return {
        "prompt": text,
        "negative_prompt": text,
        "model_id": {"type": kind("string"), "enum": [*studio.registry.ids(), *none]},
        "width": whole(MIN_SIDE, MAX_SIDE, multipleOf=8, description=area),
        "height": whole(MIN_SIDE, MAX_SIDE, multipleOf=8, description=area),
        "steps": whole(1, MAX_STEPS),
        "guidance_scale": {"type": kind("number"), "minimum": 0, "maximum": MAX_GUIDANCE},
        "seed": whole(-1, MAX_SEED, description="-1: random (the seed used is returned)"),
        "scheduler": {
            "type": kind("string"),
            "enum": [DEFAULT_SCHEDULER, *SCHEDULERS, *none],
            "description": f"{DEFAULT_SCHEDULER} (or left out): the model's own",
        },
        "batch_size": whole(1, MAX_BATCH),
    }


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


def txt2img_body(studio: Studio) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _object(field_schemas(studio))}}}


def img2img_body(studio: Studio) -> dict[str, Any]:
    strength = {"exclusiveMinimum": 0, "maximum": 1}
    data_url = {"type": "string", "minLength": 1, "description": "PNG, JPEG or WebP as a base64 data URL"}
    as_json = {**field_schemas(studio), "strength": {"type": ["number", "null"], **strength}, "image": data_url}
    as_form = {
        **field_schemas(studio, nullable=False),
        "strength": {"type": "number", **strength},
        "image": {"type": "string", "format": "binary"},
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _object(as_form, ["image"])},
            "application/json": {"schema": _object(as_json, ["image"])},
        },
    }


def file_name_parameter() -> dict[str, Any]:
    """The media path's parameter, described by hand: as a parameter of the endpoint FastAPI would publish a 422
    reply, which the server never gives."""
    return {"parameters": [{"name": "file_name", "in": "path", "required": True, "schema": {"type": "string"}}]}


def results_parameters() -> dict[str, Any]:
    limit = {"type": "integer", "minimum": 1, "maximum": RESULTS_MAX, "default": RESULTS_DEFAULT}
    return {"parameters": [{"name": "limit", "in": "query", "required": False, "schema": limit}]}


def ok_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}


def object_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"status": {"const": "success"}}, "required": ["status"]}


def generation_schema() -> dict[str, Any]:
    item = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "url": {"type": "string"},
            "prompt": {"type": "string"},
            "created_at": {"type": "string"},
            "seed": {"type": "integer"},
            "model_id": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "steps": {"type": "integer"},
            "guidance_scale": {"type": "number"},
        },
        "required": ["id", "url", "seed", "model_id", "width", "height"],
    }
    return {
        "type": "object",
        "properties": {
            "status": {"const": "success"},
            "result": item,
            "results": {"type": "array", "items": item},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["status", "result"],
    }


ERRORS = {
    400: "the request breaks a rule (the message names the field)",
    401: "credentials missing or wrong",
    404: "not found",
    409: "generation cancelled",
    413: "body too large",
    415: "unsupported content type",
    500: "the generation or the server failed",
    502: "the Inference API failed (USE_LOCAL_MODELS=false)",
    503: "model unavailable or the studio is busy",
}
GENERATION_ERRORS = (400, 409, 413, 415, 500, 502, 503)


def error_responses(codes: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    error = {
        "type": "object",
        "properties": {"status": {"const": "error"}, "error": {"type": "string"}},
        "required": ["status", "error"],
    }
    reply = {"content": {"application/json": {"schema": error}}}
    return {code: {"description": ERRORS[code], **reply} for code in sorted(codes)}
