"""DreamSketch entry point: `python app.py` (also what Hugging Face Spaces runs).

Importing this module builds the server (`app`: the FastAPI app with the HTTP API and the Gradio UI; `demo`: the
Blocks), so `uvicorn app:app` works too."""

import logging
import os
import sys

if os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU's package patches torch: it must come before torch is imported
    import spaces  # noqa: F401

from dreamsketch.config import SettingsError
from dreamsketch.registry import RegistryError
from dreamsketch.server import create_server, serve
from dreamsketch.studio import Studio

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
try:
    studio = Studio()
except (SettingsError, RegistryError, OSError) as exc:  # a setting, the registry, the gallery folder: one line
    raise SystemExit(f"error: {exc}") from None
app, demo = create_server(studio)

if __name__ == "__main__":
    try:
        serve(studio, app)
    except SettingsError as exc:  # the address cannot be listened on
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:  # Ctrl-C, after the server has stopped: one line, as `python -m dreamsketch` says it
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
