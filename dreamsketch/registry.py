"""The model registry: models.yaml, validated entry by entry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreamsketch.schedulers import SCHEDULERS

FAMILIES = ("sd15", "sd2", "sdxl")
BUILTIN_TINY = "builtin:tiny"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REQUIRED = ("id", "name", "source", "family", "width", "height", "steps", "guidance_scale")
_OPTIONAL = ("scheduler", "description", "config", "prompts")
MAX_PROMPT_CHARS = 2000  # a request's prompt limit too (a suggested prompt is a prompt)


class RegistryError(ValueError):
    """models.yaml is unreadable or one of its entries is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    source: str
    family: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None = None
    description: str = ""
    config: str | None = None  # single files only: the diffusers folder or Hub repo with the pipeline's configs
    prompts: tuple[str, ...] = ()  # the model's own suggested prompts (the UI falls back to generic ones)

    @property
    def source_kind(self) -> str:
        """One of "builtin", "single_file", "folder", "hub"."""
        if self.source == BUILTIN_TINY:
            return "builtin"
        if self.source.endswith(SINGLE_FILE_SUFFIXES):
            return "single_file"
        if Path(self.source).is_absolute():
            return "folder"
        return "hub"

    @property
    def config_kind(self) -> str | None:
        """None (no `config`), "folder" or "hub"."""
        if self.config is None:
            return None
        return "folder" if Path(self.config).is_absolute() else "hub"

    @property
    def native_area(self) -> int:
        return self.width * self.height


class Registry:
    """The models of one registry file, in file order."""

    def __init__(self, models: list[ModelSpec], path: Path | None = None) -> None:
        self.path = path
        self.models = {m.id: m for m in models}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.models

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(self.models)
            raise KeyError(f"unknown model {model_id!r}; known models: {known}") from None

    def ids(self) -> list[str]:
        return list(self.models)


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file. Local sources resolve against the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, list) or not data:
        raise RegistryError(f"{path}: expected a non-empty list of models")
    models: list[ModelSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        spec = _parse_entry(path, index, entry)
        if spec.id in seen:
            raise RegistryError(f"{path}: entry {index} ({spec.id}): field 'id': duplicate id")
        seen.add(spec.id)
        models.append(spec)
    return Registry(models, path)


def _parse_entry(path: Path, index: int, entry: Any) -> ModelSpec:
    label = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise RegistryError(f"{label}: expected a mapping of fields")
    if isinstance(entry.get("id"), str):
        label += f" ({entry['id']})"

    def fail(field: str, rule: str) -> RegistryError:
        return RegistryError(f"{label}: field '{field}': {rule}")

    for field in _REQUIRED:
        if field not in entry:
            raise fail(field, "missing")
    for field in entry:
        if field not in _REQUIRED + _OPTIONAL:
            raise fail(field, "unknown field")
    for field in ("id", "name", "source"):
        if not isinstance(entry[field], str) or not entry[field].strip():
            raise fail(field, "must be a non-empty string")
    if not _MODEL_ID.match(entry["id"]):
        raise fail("id", "lower-case letters, digits, '.', '_' and '-' only")
    if entry["family"] not in FAMILIES:
        raise fail("family", f"must be one of {', '.join(FAMILIES)}")
    for field in ("width", "height"):
        value = entry[field]
        if type(value) is not int or not 64 <= value <= 2048 or value % 8:
            raise fail(field, "must be a multiple of 8 from 64 to 2048")
    if type(entry["steps"]) is not int or not 1 <= entry["steps"] <= 150:
        raise fail("steps", "must be a whole number from 1 to 150")
    guidance = entry["guidance_scale"]
    if type(guidance) not in (int, float) or not 0 <= guidance <= 30:
        raise fail("guidance_scale", "must be a number from 0 to 30")
    scheduler = entry.get("scheduler")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise fail("scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    source = _resolve_source(entry["source"], path.parent)
    if source != BUILTIN_TINY and source.startswith("builtin:"):
        raise fail("source", f"the only builtin source is {BUILTIN_TINY}")
    config = entry.get("config")
    if "config" in entry:
        if not isinstance(config, str) or not config.strip():
            raise fail("config", "must be a non-empty string")
        config = _resolve_source(config, path.parent)
    prompts = entry.get("prompts", [])
    if not isinstance(prompts, list):
        raise fail("prompts", f"must be a list of non-empty strings, each at most {MAX_PROMPT_CHARS:,} characters")
    for number, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail("prompts", f"prompt {number}: must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise fail("prompts", f"prompt {number}: at most {MAX_PROMPT_CHARS:,} characters (got {len(prompt):,})")
    spec = ModelSpec(
        id=entry["id"],
        name=entry["name"],
        source=source,
        family=entry["family"],
        width=entry["width"],
        height=entry["height"],
        steps=entry["steps"],
        guidance_scale=float(guidance),
        scheduler=scheduler,
        description=str(entry.get("description", "")),
        config=config,
        prompts=tuple(prompts),
    )
    if spec.source_kind == "hub" and not _REPO_ID.match(source):
        raise fail("source", "not a Hub repo id (owner/name), a local path, a .safetensors/.ckpt file or builtin:tiny")
    config_rule = _config_rule(spec)
    if config_rule:
        raise fail("config", config_rule)
    return spec


def _config_rule(spec: ModelSpec) -> str | None:
    """What is wrong with the entry's `config`, if anything."""
    if spec.config is None:
        return None
    if spec.source_kind != "single_file":
        return "only for a single-file .safetensors/.ckpt source"
    if spec.config_kind == "folder" and not is_diffusers_folder(spec.config):
        return f"no diffusers folder at {spec.config} (model_index.json missing)"
    if spec.config_kind == "hub" and not _REPO_ID.match(spec.config):
        return "not a local diffusers folder or a Hub repo id (owner/name)"
    return None


def is_diffusers_folder(path: str) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _resolve_source(source: str, base: Path) -> str:
    """Local paths ("./x", "x.safetensors", or an existing folder) become absolute, against `base`."""
    source = source.strip()
    if source.startswith("builtin:") or Path(source).is_absolute():
        return source
    local = base / source
    if source.startswith(".") or source.endswith(SINGLE_FILE_SUFFIXES) or local.exists():
        return str(local.resolve())
    return source
