"""Shared fixtures: tiny pipelines built here (never downloaded), registries and studios on temporary folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dreamsketch.config import Settings  # noqa: E402
from dreamsketch.tiny import build_tiny_pipeline, tiny_vocab  # noqa: E402

TINY_REPO = "dreamsketch-tests/tiny-sd"
TINY_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session", autouse=True)
def temp_folder_inside_pytests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """gradio_client leaves an empty folder in the temp folder for every file it downloads (Gradio 6.31): keep them,
    and every other temporary file of a run, in pytest's own folder, which pytest prunes."""
    tempfile.tempdir = str(tmp_path_factory.getbasetemp())
    yield
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline saved as a local diffusers folder, its tokenizer read from files."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny")
    vocab_file, merges_file = root / "vocab.json", root / "merges.txt"
    vocab_file.write_text(json.dumps(tiny_vocab()), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
    folder = root / "pipeline"
    build_tiny_pipeline(tokenizer, seed=1).save_pretrained(folder)
    return folder


def lay_into_hub_cache(folder: Path, hf_home: Path, repo_id: str) -> None:
    """Copy a diffusers folder into a Hugging Face cache in the Hub's own layout (blobs, snapshots, refs)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / TINY_COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(TINY_COMMIT)


def write_registry(path: Path, entries: list[dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return path


def entry(model_id: str, source: str, size: int = 128, **extra: object) -> dict:
    return {
        "id": model_id,
        "name": model_id,
        "source": source,
        "family": "sd15",
        "width": size,
        "height": size,
        "steps": 4,
        "guidance_scale": 7.5,
        **extra,
    }


@pytest.fixture
def settings(tmp_path: Path, tiny_pipeline_dir: Path) -> Settings:
    """Settings for a registry of tiny models: the builtin one, a local folder and an uncached Hub repo."""
    registry = write_registry(
        tmp_path / "models.yaml",
        [
            entry("tiny-demo", "builtin:tiny"),
            entry("tiny-folder", str(tiny_pipeline_dir)),
            entry("uncached-hub", "nobody-here/not-cached"),
        ],
    )
    return Settings(models_file=registry, output_dir=tmp_path / "outputs", default_model="tiny-demo")
