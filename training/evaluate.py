"""Judge tiny-shapes by pixel analysis on held-out scenes and write the table into its model card.

    .venv/bin/python -m training.evaluate [--model models/tiny-shapes] [--count 200]

The judge: the background colour is the median of the 2-pixel border; the shape is the largest connected
region of pixels closer to the median of the clearly different pixels than to the background; its colour
is that median, and its kind is the ideal circle, square or triangle, drawn into the region's bounding box,
that overlaps the region most (intersection over union). Colours are named by the nearest entry of
training.shapes.COLOURS.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw
from scipy import ndimage

from training import shapes

STEPS, GUIDANCE = 20, 5.0
GUIDANCES = (GUIDANCE, 2.0, 1.0)  # the 5 and 1 (no guidance), and 2: the registry's default for tiny-shapes
DIFFERENT = 60  # RGB distance from the background above which a pixel is clearly not background
MARKERS = ("<!-- evaluation -->", "<!-- /evaluation -->")


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None
    shape: str | None
    mask: np.ndarray


def colour_name(rgb: np.ndarray) -> str:
    return min(shapes.COLOURS, key=lambda name: np.linalg.norm(rgb - shapes.COLOURS[name]))


def judge(image: Image.Image) -> Verdict:
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    different = np.linalg.norm(pixels - background, axis=2) > DIFFERENT
    if not different.any():
        return Verdict(colour_name(background), None, None, different)
    fill = np.median(pixels[different], axis=0)
    closer = np.linalg.norm(pixels - fill, axis=2) < np.linalg.norm(pixels - background, axis=2)
    labels, count = ndimage.label(closer)
    mask = labels == 1 + np.argmax(ndimage.sum(closer, labels, range(1, count + 1)))
    return Verdict(colour_name(background), colour_name(fill), shape_name(mask), mask)


def shape_overlaps(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each shape's ideal form filling the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    region = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = region.shape
    overlaps = {}
    for shape in shapes.SHAPES:
        ideal = Image.new("1", (width, height))
        shapes.draw_shape(ImageDraw.Draw(ideal), shape, (0, 0, width - 1, height - 1), 1)
        overlaps[shape] = iou(region, np.asarray(ideal))
    return overlaps


def shape_name(mask: np.ndarray) -> str:
    overlaps = shape_overlaps(mask)
    return max(overlaps, key=overlaps.__getitem__)


def held_out_prompts(count: int, seed: int = 0) -> list[tuple[shapes.Scene, str]]:
    """`count` held-out scenes with captions that sometimes leave out size or position."""
    rng = random.Random(seed)
    scenes = rng.sample(shapes.split_scenes()[1], count)
    return [(s, s.caption(rng.random() >= 0.3, rng.random() >= 0.3)) for s in scenes]


def generate(
    pipe: DiffusionPipeline, prompts: list[str], seed: int = 0, chunk: int = 50, **kwargs
) -> list[Image.Image]:
    """One image per prompt, the i-th from seed + i, in chunks; kwargs go to the pipeline."""
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, **kwargs}
    images = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        extra = {k: v[start : start + chunk] if k == "image" else v for k, v in kwargs.items()}
        images += pipe(part, generator=generators, **extra).images
    return images


def accuracy(scenes: list[shapes.Scene], images: list[Image.Image]) -> dict[str, float]:
    verdicts = [judge(image) for image in images]
    hits = {
        "shape colour": [v.colour == s.colour for s, v in zip(scenes, verdicts, strict=True)],
        "background": [v.background == s.background for s, v in zip(scenes, verdicts, strict=True)],
        "shape": [v.shape == s.shape for s, v in zip(scenes, verdicts, strict=True)],
    }
    hits["all three"] = [all(h) for h in zip(*hits.values(), strict=True)]
    return {name: 100 * float(np.mean(h)) for name, h in hits.items()}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def img2img_scores(pipe: StableDiffusionPipeline, count: int, strengths: tuple[float, ...]) -> dict[float, dict]:
    """Redraw pictures of held-out scenes with the prompt of another scene: how much of the input's shape
    survives (IoU of the shape masks) and how often the result matches the new prompt's colours."""
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    pairs = held_out_prompts(2 * count, seed=1)
    sources, targets = pairs[:count], pairs[count:]
    inputs = [shapes.draw(scene) for scene, _ in sources]
    input_masks = [judge(image).mask for image in inputs]
    results = {}
    for strength in strengths:
        images = generate(img2img, [p for _, p in targets], image=inputs, strength=strength)
        verdicts = [judge(image) for image in images]
        follows = [
            v.colour == s.colour and v.background == s.background for (s, _), v in zip(targets, verdicts, strict=True)
        ]
        overlap = [iou(m, v.mask) for m, v in zip(input_masks, verdicts, strict=True)]
        results[strength] = {"iou": float(np.mean(overlap)), "follows": 100 * float(np.mean(follows))}
    return results


def seconds_per_image(pipe: StableDiffusionPipeline, runs: int = 5) -> float:
    """Median wall time of one 64x64 image, 20 steps, guidance 5."""
    times = []
    for i in range(runs):
        start = time.perf_counter()
        generate(pipe, ["a red circle on a blue background"], seed=i)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def table(by_guidance: dict[float, dict], img2img: dict[float, dict], seconds: float, counts: tuple[int, int]) -> str:
    lines = [
        f"Text to image: {counts[0]} held-out prompts, {STEPS} steps, fixed seeds; accuracy in %.",
        "",
        "| guidance | " + " | ".join(next(iter(by_guidance.values()))) + " |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {g:g} | " + " | ".join(f"{v:.1f}" for v in s.values()) + " |" for g, s in by_guidance.items()]
    lines += [
        "",
        f"Image to image: {counts[1]} drawn pictures redrawn with another scene's prompt, guidance {GUIDANCE:g}.",
        "",
        "| strength | IoU of the shape with the input's | matches the new prompt's colours (%) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s:g} | {r['iou']:.2f} | {r['follows']:.1f} |" for s, r in img2img.items()]
    lines += ["", f"One 64x64 image, {STEPS} steps, guidance {GUIDANCE:g}, batch 1: {seconds:.2f} s (median of 5)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-shapes")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--img2img-count", type=int, default=40)
    parser.add_argument("--card", default=None, help="model card to update (default: <model>/README.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    scenes, prompts = zip(*held_out_prompts(args.count), strict=True)
    by_guidance = {g: accuracy(list(scenes), generate(pipe, list(prompts), guidance_scale=g)) for g in GUIDANCES}
    img2img = img2img_scores(pipe, args.img2img_count, (0.3, 0.9))
    text = table(by_guidance, img2img, seconds_per_image(pipe), (args.count, args.img2img_count))
    print(text)
    card = Path(args.card or Path(args.model) / "README.md")
    if card.exists():
        pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.S)
        card.write_text(pattern.sub(lambda _: f"{MARKERS[0]}\n{text}\n{MARKERS[1]}", card.read_text()))


if __name__ == "__main__":
    main()
