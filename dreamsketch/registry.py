"""The model registry: models.yaml, validated entry by entry."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreamsketch.schedulers import SCHEDULERS

FAMILIES = ("sd15", "sd2", "sdxl")
BUILTIN_TINY = "builtin:tiny"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # fullmatch: "$" would let a final newline through
_MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
LINE_BREAKS = ("Cc", "Zl", "Zp")  # Unicode categories: control characters (\n, \t, ...), line and paragraph separators
_REQUIRED = ("id", "name", "source", "family", "width", "height", "steps", "guidance_scale")
_OPTIONAL = ("scheduler", "description", "config", "prompts")
_MERGE_TAG = "tag:yaml.org,2002:merge"
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
    data = _read_yaml(path)
    if not isinstance(data, list) or not data:
        raise RegistryError(f"{path}: expected a non-empty list of models")
    models: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(data, start=1):  # counted as people count them, as YAML's lines are
        spec = _parse_entry(path, index, entry)
        if spec.id in seen:
            raise RegistryError(f"{path}: entry {index} ({spec.id}): field 'id': the same as entry {seen[spec.id]}'s")
        seen[spec.id] = index
        models.append(spec)
    return Registry(models, path)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_RegistryLoader)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML at {_yaml_problem(exc, text)}") from None


class _RegistryLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping and places a bad value (2024-13-45) in the file."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # the keys as written (SafeLoader puts `<<` merges' keys, which these may override, in front); super refuses
        # a node that is not a mapping (`!!map x`)
        written = [key for key, _ in node.value if key.tag != _MERGE_TAG] if isinstance(node, yaml.MappingNode) else []
        mapping = super().construct_mapping(node, deep)
        seen: set[Hashable] = set()
        for key_node in written:
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return mapping


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error on one line (its own spans lines and names "<unicode string>"): where, what, and in what."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, placed by its offset only
        line = text.count("\n", 0, exc.position)
        column = exc.position - text.rfind("\n", 0, exc.position) - 1
        return f"{_at(line, column)}: character #x{exc.character:04x}: {exc.reason}"
    assert isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark  # the loader's other errors all have a place
    problem = f"{_at(exc.problem_mark.line, exc.problem_mark.column)}: {exc.problem}"
    if exc.context and exc.context_mark:
        problem += f" ({exc.context} at {_at(exc.context_mark.line, exc.context_mark.column)})"
    return problem


def _at(line: int, column: int) -> str:
    """A 0-based place as people count it."""
    return f"line {line + 1}, column {column + 1}"


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
    for field in ("id", "name"):  # shown in lists and tables; `source` is read without its surrounding blanks
        if any(unicodedata.category(character) in LINE_BREAKS for character in entry[field]):
            raise fail(field, "must be one line, without control characters (a folded YAML '>' ends in a newline)")
    if not _MODEL_ID.fullmatch(entry["id"]):
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
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULERS):
        raise fail("scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string")
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
    for number, prompt in enumerate(prompts, start=1):
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
        description=description,
        config=config,
        prompts=tuple(prompts),
    )
    if source.lower().endswith(SINGLE_FILE_SUFFIXES) and spec.source_kind != "single_file":
        raise fail("source", "a single file's suffix is read in lower case (.safetensors or .ckpt): rename the file")
    if spec.source_kind == "hub" and not _REPO_ID.fullmatch(source):
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
    if spec.config_kind == "hub" and not _REPO_ID.fullmatch(spec.config):
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
