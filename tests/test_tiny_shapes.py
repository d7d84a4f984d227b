"""The bundled tiny-shapes model: loads offline like any local model and draws what it is told."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dreamsketch.config import Settings
from dreamsketch.pipelines import PipelineCache
from dreamsketch.registry import load_registry
from dreamsketch.studio import Studio
from training import evaluate, shapes

ROOT = Path(__file__).resolve().parents[1]
SCENES = [
    shapes.Scene("circle", "red", "blue", "large", "center"),
    shapes.Scene("square", "yellow", "black", "large", "top left"),
    shapes.Scene("triangle", "white", "green", "large", "bottom right"),
    shapes.Scene("square", "orange", "purple", "small", "center"),
    shapes.Scene("circle", "blue", "white", "large", "bottom left"),
    shapes.Scene("triangle", "black", "yellow", "large", "center"),
]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    registry = load_registry(ROOT / "models.yaml")
    cache = PipelineCache(Settings(device="cpu", dtype="fp32"), registry)
    return cache.get("tiny-shapes")


def test_registered_and_small() -> None:
    spec = load_registry(ROOT / "models.yaml").get("tiny-shapes")
    assert (spec.family, spec.width, spec.height, spec.source_kind) == ("sd15", 64, 64, "folder")
    assert Path(spec.source) == ROOT / "models" / "tiny-shapes"
    weights = sum(f.stat().st_size for f in Path(spec.source).rglob("*.safetensors"))
    assert weights < 20 * 2**20


def test_draws_the_asked_colours(model) -> None:  # type: ignore[no-untyped-def]
    images = evaluate.generate(model.txt2img, [s.caption() for s in SCENES], seed=10)
    verdicts = [evaluate.judge(image) for image in images]
    assert [v.background for v in verdicts] == [s.background for s in SCENES]
    assert sum(v.colour == s.colour for s, v in zip(SCENES, verdicts, strict=True)) >= 4


def test_draws_the_asked_shapes(model) -> None:  # type: ignore[no-untyped-def]
    """Chance is 33%; the model gets 96% of the 200 held-out prompts right at its registry guidance."""
    scenes, prompts = zip(*evaluate.held_out_prompts(30, seed=7), strict=True)
    assert evaluate.accuracy(list(scenes), evaluate.generate(model.txt2img, list(prompts)))["shape"] >= 85


def colour_error(scenes: list[shapes.Scene], images: list) -> float:  # type: ignore[type-arg]
    """Mean RGB distance between the judged shape's median colour and the colour the prompt names
    (255 where no shape was drawn)."""
    errors = []
    for scene, image in zip(scenes, images, strict=True):
        pixels = np.asarray(image, dtype=float)[evaluate.judge(image).mask]
        named = shapes.COLOURS[scene.colour]
        errors.append(np.linalg.norm(np.median(pixels, axis=0) - named) if len(pixels) else 255.0)
    return float(np.mean(errors))


def shape_fit(scenes: list[shapes.Scene], images: list) -> float:  # type: ignore[type-arg]
    """Mean IoU of the judged shape with the ideal form of the shape the prompt names (0 where none was drawn)."""
    masks = [evaluate.judge(image).mask for image in images]
    return float(
        np.mean([evaluate.shape_overlaps(m)[s.shape] if m.any() else 0.0 for s, m in zip(scenes, masks, strict=True)])
    )


def test_guidance_makes_it_follow_the_prompt(model) -> None:  # type: ignore[no-untyped-def]
    """At the registry's guidance (2) the shape's colour is nearer the named one, and its outline nearer the
    named shape, than without guidance (1). Accuracy rises too (96% against 85.5% of all three right on the 200
    held-out prompts), but 40 prompts are too few to show it reliably; these distances are."""
    scenes, prompts = zip(*evaluate.held_out_prompts(40, seed=5), strict=True)
    assert model.spec.guidance_scale == 2.0
    images = {g: evaluate.generate(model.txt2img, list(prompts), guidance_scale=g) for g in (2.0, 1.0)}
    assert colour_error(list(scenes), images[2.0]) < 0.85 * colour_error(list(scenes), images[1.0])
    assert shape_fit(list(scenes), images[2.0]) > shape_fit(list(scenes), images[1.0]) + 0.02


def test_img2img_strength_trades_layout_for_prompt(model) -> None:  # type: ignore[no-untyped-def]
    scores = evaluate.img2img_scores(model.txt2img, 12, (0.3, 0.9))
    assert scores[0.3]["iou"] > scores[0.9]["iou"]
    assert scores[0.9]["follows"] > scores[0.3]["follows"]


def test_offline_start_picks_it_and_draws_the_readme_prompt(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What `make run` does on a machine with no network and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    studio = Studio(Settings(models_file=ROOT / "models.yaml", output_dir=tmp_path / "outputs", device="cpu"))
    assert studio.default_model == "tiny-shapes"
    for seed in (1, 2, 3):
        result = studio.generate(studio.parse({"prompt": "a red circle on a blue background", "seed": seed}, "txt2img"))
        verdict = evaluate.judge(result.generation.images[0])
        assert (verdict.shape, verdict.colour, verdict.background) == ("circle", "red", "blue")
