"""Settings from the environment (and a `.env` file); every default lives here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values, load_dotenv

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")


class SettingsError(ValueError):
    """An environment variable has a value DreamSketch cannot use."""


@dataclass(frozen=True)
class Settings:
    models_file: Path = Path("models.yaml")
    output_dir: Path = Path("outputs")
    default_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_loaded: int = 1
    compile: bool = False
    queue_size: int = 32
    auth: tuple[str, str] | None = None
    use_local_models: bool = True
    hf_token: str | None = None
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    inference_api_url: str | None = None

    @property
    def local_url(self) -> str:
        """The server's address from this machine (listening on every address, 0.0.0.0 or ::, 127.0.0.1 works)."""
        host = "127.0.0.1" if self.server_name in ("0.0.0.0", "::") else self.server_name
        return http_url(host, self.server_port)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read settings; a `.env` in the working directory fills in what the environment lacks."""
        if environ is None:
            _load_dotenv(Path.cwd() / ".env")
            environ = dict(os.environ)
        env = {k: v for k, v in environ.items() if v != ""}
        return cls(
            models_file=Path(env.get("DREAMSKETCH_MODELS_FILE", cls.models_file)),
            output_dir=Path(env.get("DREAMSKETCH_OUTPUT_DIR", cls.output_dir)),
            default_model=env.get("DREAMSKETCH_DEFAULT_MODEL"),
            device=_choice(env, "DREAMSKETCH_DEVICE", DEVICES, cls.device),
            dtype=_choice(env, "DREAMSKETCH_DTYPE", DTYPES, cls.dtype),
            max_loaded=_positive_int(env, "DREAMSKETCH_MAX_LOADED", cls.max_loaded),
            compile=_flag(env, "DREAMSKETCH_COMPILE", cls.compile),
            queue_size=_positive_int(env, "DREAMSKETCH_QUEUE_SIZE", cls.queue_size),
            auth=_auth(env.get("DREAMSKETCH_AUTH")),
            use_local_models=_flag(env, "USE_LOCAL_MODELS", cls.use_local_models),
            hf_token=env.get("HF_TOKEN"),
            server_name=env.get("GRADIO_SERVER_NAME", cls.server_name),
            server_port=_positive_int(env, "GRADIO_SERVER_PORT", cls.server_port, highest=65535),
            inference_api_url=env.get("DREAMSKETCH_INFERENCE_API_URL"),
        )


def http_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _load_dotenv(path: Path) -> None:
    """Fill in from `path` the variables that are unset or empty (an empty one counts as unset everywhere)."""
    try:
        for name in dotenv_values(path, interpolate=False):
            if os.environ.get(name) == "":
                del os.environ[name]
        load_dotenv(path, override=False)  # ${NAME} in its values: the environment's NAME first, as before
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _positive_int(env: dict[str, str], name: str, default: int, highest: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    digits = raw.isascii() and raw.isdigit()  # str.isdigit alone takes "²" and "٣"
    if not digits or int(raw) < 1 or (highest is not None and int(raw) > highest):
        rule = "of at least 1" if highest is None else f"from 1 to {highest}"
        raise SettingsError(f"{name}={raw!r}: expected a whole number {rule}")
    return int(raw)


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true/false or 1/0")


def _auth(raw: str | None) -> tuple[str, str] | None:
    if raw is None:
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise SettingsError("DREAMSKETCH_AUTH: expected user:password")
    return user, password
