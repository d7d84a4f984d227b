"""The bundled tiny-shapes model: loads offline like any local model and draws what it is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamsketch.config import Settings
from dreamsketch.pipelines import PipelineCache
from dreamsketch.registry import load_registry
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
    """Chance is 33%; squares are its weak spot (they come out with rounded corners), so 30 prompts, not 6."""
    scenes, prompts = zip(*evaluate.held_out_prompts(30, seed=7), strict=True)
    assert evaluate.accuracy(list(scenes), evaluate.generate(model.txt2img, list(prompts)))["shape"] >= 60


def test_guidance_makes_it_follow_the_prompt(model) -> None:  # type: ignore[no-untyped-def]
    scenes, prompts = zip(*evaluate.held_out_prompts(24, seed=5), strict=True)
    with_guidance = evaluate.accuracy(list(scenes), evaluate.generate(model.txt2img, list(prompts)))
    without = evaluate.accuracy(list(scenes), evaluate.generate(model.txt2img, list(prompts), guidance_scale=1.0))
    assert with_guidance["all three"] > without["all three"]


def test_img2img_strength_trades_layout_for_prompt(model) -> None:  # type: ignore[no-untyped-def]
    scores = evaluate.img2img_scores(model.txt2img, 12, (0.3, 0.9))
    assert scores[0.3]["iou"] > scores[0.9]["iou"]
    assert scores[0.9]["follows"] > scores[0.3]["follows"]
