"""One server, one port: the HTTP API (/api/*, /media/generated/*) with the Gradio app (UI, gradio_client, MCP) at /."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import anyio
import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from dreamsketch import zerogpu
from dreamsketch.api import basic_auth_ok, create_app, error_reply
from dreamsketch.config import Settings, SettingsError, http_url
from dreamsketch.gallery import Gallery
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.studio import Studio
from dreamsketch.ui import CSS, THEME, build_demo

log = logging.getLogger(__name__)
MAX_UPLOAD = "20mb"  # DESIGN.md: input images at most 20 MB
FILE_ROUTE = "/gradio_api/file="
MCP_ROUTE = "/gradio_api/mcp"
SHUTDOWN_GRACE_S = 5  # Ctrl-C / SIGTERM: open connections get this long, then are closed


class Guard:
    """In front of Gradio: its file route serves gallery PNGs only from the gallery folder (never the SQLite index,
    temporary or other files that allowed_paths would expose), and MCP, which Gradio leaves open, needs the
    DREAMSKETCH_AUTH credentials (HTTP Basic) when they are set."""

    def __init__(self, app: ASGIApp, gallery: Gallery, auth: tuple[str, str] | None) -> None:
        self.app = app
        self.gallery = gallery
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = await self.refusal(scope) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)

    async def refusal(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        # The index is read in a thread: a query, or a rebuild of a lost index, must not hold up the event loop.
        target = path.removeprefix(FILE_ROUTE)
        if path.startswith(FILE_ROUTE) and not await anyio.to_thread.run_sync(self.may_serve, target):
            return error_reply(404, "not found")
        if self.auth and path.startswith(MCP_ROUTE) and not self.signed_in(scope, self.auth):
            return error_reply(401, "authentication required", {"WWW-Authenticate": 'Basic realm="DreamSketch"'})
        return None

    @staticmethod
    def signed_in(scope: Scope, auth: tuple[str, str]) -> bool:
        return basic_auth_ok(Headers(scope=scope).get("authorization"), auth)

    def may_serve(self, target: str) -> bool:
        """Outside the gallery folder Gradio's own rules apply; inside it, only PNGs named in the index."""
        if "\x00" in target:
            return False
        path = Path(os.path.abspath(target))  # as Gradio's file route reads it
        folder = self.gallery.folder
        if not (path.is_relative_to(folder) or path.resolve().is_relative_to(folder)):
            return True
        return self.gallery.holds(path)


def create_server(studio: Studio | None = None) -> tuple[FastAPI, gr.Blocks]:
    """The root FastAPI app (HTTP API first, then Gradio mounted at /) and the Blocks it serves."""
    studio = studio or Studio()
    settings = studio.settings
    app = create_app(studio)
    # Gallery PNGs are served where they lie (never changed once written); else Gradio copied each picture it
    # showed or returned into its cache, for good. (The Guard decides which of the folder's files are served.)
    gr.set_static_paths([studio.gallery.folder])
    demo = build_demo(studio)
    # Waiting events beyond queue_size get Gradio's "queue is full" error; generations share the "gpu" queue.
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        server_name=settings.server_name,
        server_port=settings.server_port,
        auth=settings.auth,
        auth_message="DreamSketch: sign in with the DREAMSKETCH_AUTH user and password.",
        allowed_paths=[str(studio.gallery.folder)],
        max_file_size=MAX_UPLOAD,
        show_error=True,
        ssr_mode=False,
        mcp_server=True,
        footer_links=["api", "gradio", "settings"],
        theme=THEME,
        css=CSS,
    )
    # Gradio checks that an input file was uploaded (not any path on the server a client names) only in apps it
    # launched itself; this one it mounts.
    demo.has_launched = True
    app.add_middleware(Guard, gallery=studio.gallery, auth=settings.auth)
    call_mcp_tools_here(demo, settings.auth)
    return app, demo


_MCP_CLIENT_LOCK = threading.Lock()


def call_mcp_tools_here(demo: gr.Blocks, auth: tuple[str, str] | None) -> None:
    """Gradio 6.31's MCP server runs tool calls through a gradio_client of its own, made at the first call for the
    address that call came to: behind a proxy (Spaces'), the public one its X-Forwarded headers named, so tool calls
    went out through the proxy (failing on a private Space), and to wherever the first caller's headers pointed,
    with DREAMSKETCH_AUTH's credentials. It is made for the address this server's own socket took that call on, and
    signs in with the app's credentials (without them every call failed: "credentials were not provided"). Uses
    Gradio's private MCP surface (`_get_or_create_client`, `_client_instance`, `_local_url`): check on upgrade."""
    import gradio.mcp
    from gradio_client import Client

    mcp = demo.mcp_server_obj
    assert mcp is not None  # made when the app was mounted with mcp_server=True
    make_client = mcp._get_or_create_client

    def local_client() -> Client:
        with _MCP_CLIENT_LOCK:  # Gradio's module global is swapped while its client is made
            request = mcp.mcp_server.request_context.request
            if mcp._client_instance is None and request is not None:
                host, port = request.scope["server"]
                mcp._local_url = http_url(host, port)
            original = gradio.mcp.Client
            if auth:
                gradio.mcp.Client = functools.partial(Client, auth=auth)  # type: ignore[misc]
            try:
                return make_client()
            finally:
                gradio.mcp.Client = original  # type: ignore[misc]

    mcp._get_or_create_client = local_client  # type: ignore[method-assign]


def serve(studio: Studio | None = None, app: FastAPI | None = None) -> None:
    """Run the server (built here unless given) on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT (default 127.0.0.1:7860)."""
    studio = studio or Studio()
    if app is None:
        app, _demo = create_server(studio)
    settings = studio.settings
    sock = listen(settings)
    log.info("gallery: %s (%d images)", studio.gallery.folder, studio.gallery.count())
    if settings.auth:
        log.info("sign-in required (DREAMSKETCH_AUTH)")
    if zerogpu.on_zero_gpu():  # ZeroGPU's start-up hands the weights loaded before it to its workers
        preload_default(studio)
        zerogpu.start_up()
    else:
        threading.Thread(target=preload_default, args=(studio,), name="preload", daemon=True).start()
    print(f"DreamSketch on {settings.local_url} (MCP: {settings.local_url}/gradio_api/mcp/)", flush=True)
    # Open streams (a browser tab's heartbeat, the MCP server's connection to this app) never close by themselves:
    # without a limit, Ctrl-C or SIGTERM waited for them forever.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    StudioServer(config, studio).run(sockets=[sock])


def listen(settings: Settings) -> socket.socket:
    """The server's socket, bound here so that a port in use is one line naming the setting, before the start-up
    message (uvicorn announced the address, then failed)."""
    host, port = settings.server_name, settings.server_port
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        dual = host == "::" and socket.has_dualstack_ipv6()  # as 0.0.0.0 does, and as local_url says
        return socket.create_server((host, port), family=family, dualstack_ipv6=dual)
    except OSError as exc:
        raise SettingsError(
            f"GRADIO_SERVER_NAME={host!r}, GRADIO_SERVER_PORT={port}: cannot listen there ({exc.strerror or exc})"
        ) from None


class StudioServer(uvicorn.Server):
    """Ctrl-C or SIGTERM first cancels the running generations, which stop within a step: their callers get a
    "shutting down" reply inside the grace period (not a cut connection), nothing of theirs is saved, and the
    process ends in seconds (Ctrl-C waited for the running generation, then saved its pictures)."""

    def __init__(self, config: uvicorn.Config, studio: Studio) -> None:
        super().__init__(config)
        self.studio = studio

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.studio.shut_down()
        # A browser tab's heartbeat stream ends when Gradio's stop event is set (its own launch() sets it; a mounted
        # app's is never set): else it was cut after the grace period, with a traceback in the log for each tab.
        loop = asyncio.get_running_loop()
        for route in getattr(self.config.app, "routes", []):
            if isinstance(route, Mount) and isinstance(stop := getattr(route.app, "stop_event", None), asyncio.Event):
                loop.call_soon_threadsafe(stop.set)
        super().handle_exit(sig, frame)


def preload_default(studio: Studio) -> None:
    """Load the default model while the server starts, so that the first Generate does not wait for it."""
    try:
        studio.engine.preload(studio.default_model)
    except (ModelUnavailableError, OSError) as exc:
        log.warning("could not preload %s: %s", studio.default_model, exc)
    except Exception:  # the server serves on; a request for the model will say what is wrong
        log.exception("could not preload %s", studio.default_model)


@contextmanager
def running_server(app: FastAPI, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port from a background thread; yields its URL (tests, benchmarks)."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else keep-alive replies wait 40 ms for ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn {url}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {url} did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        # Open streams (a client's heartbeat) are cut after a second; keep uvicorn from logging that as errors.
        errors = logging.getLogger("uvicorn.error")
        level = errors.level
        errors.setLevel(logging.CRITICAL)
        try:
            server.should_exit = True
            thread.join(timeout=15)
        finally:
            errors.setLevel(level)
            sock.close()
