"""Pictures of one flat-colour shape on a flat background, drawn by code, and their captions.

Grammar (parts in brackets are optional and left out at random):

    a [SIZE] COLOUR SHAPE [in the POSITION] on a COLOUR background

SIZE: small, large. SHAPE: circle, square, triangle. COLOUR: the keys of COLOURS (shape and background
colours differ). POSITION: a cell of a 3x3 grid, e.g. "top left", "center", "bottom right".
"a" becomes "an" before a vowel: "an orange square on a black background".
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (250, 150, 20),
    "yellow": (245, 230, 50),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = {"small": 18, "large": 36}
ROWS, COLUMNS = ("top", "center", "bottom"), ("left", "center", "right")
POSITIONS = tuple("center" if (row, col) == ("center", "center") else f"{row} {col}" for row in ROWS for col in COLUMNS)
JITTER = 3  # pixels a shape may move from its grid cell's centre
HELD_OUT_SHARE = 10  # one scene in 10 is kept out of training, for evaluation


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self, with_size: bool = True, with_position: bool = True) -> str:
        words = [self.size] if with_size else []
        words += [self.colour, self.shape]
        if with_position:
            words += ["in the", self.position]
        return f"{_article(words[0])} {' '.join(words)} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_scenes() -> list[Scene]:
    combos = itertools.product(SHAPES, COLOURS, COLOURS, SIZES, POSITIONS)
    return [Scene(*combo) for combo in combos if combo[1] != combo[2]]


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes); the same split every time."""
    scenes = all_scenes()
    held = set(random.Random(1234).sample(range(len(scenes)), len(scenes) // HELD_OUT_SHARE))
    train = [s for i, s in enumerate(scenes) if i not in held]
    return train, [s for i, s in enumerate(scenes) if i in held]


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "in", "the", "on", "background", *SHAPES, *COLOURS, *SIZES}
    return sorted(words | {w for p in POSITIONS for w in p.split()})


def shape_box(scene: Scene, dx: int = 0, dy: int = 0) -> tuple[int, int, int, int]:
    """The shape's bounding box (left, top, right, bottom), pixels inclusive."""
    side = SIZES[scene.size]
    margin = side // 2 + JITTER + 2
    words = scene.position.split()
    row, col = (words * 2)[:2] if len(words) == 1 else words
    step = (SIZE - 2 * margin) // 2
    cx = margin + COLUMNS.index(col) * step + dx
    cy = margin + ROWS.index(row) * step + dy
    return cx - side // 2, cy - side // 2, cx + side // 2 - 1, cy + side // 2 - 1


def draw(scene: Scene, dx: int = 0, dy: int = 0) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.background])
    draw_shape(ImageDraw.Draw(image), scene.shape, shape_box(scene, dx, dy), COLOURS[scene.colour])
    return image


def draw_shape(
    pen: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...] | int
) -> None:
    """Fill `shape` into the box (left, top, right, bottom), pixels inclusive; triangles point up."""
    left, top, right, bottom = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def sample(scenes: list[Scene], count: int, seed: int, drop: float = 0.3) -> tuple[np.ndarray, list[str]]:
    """`count` pictures (uint8, N x 64 x 64 x 3) of random scenes with jitter, and captions that leave
    out the size and the position each with probability `drop`. The same seed gives the same data."""
    rng = random.Random(seed)
    images, captions = np.empty((count, SIZE, SIZE, 3), np.uint8), []
    for i in range(count):
        scene = rng.choice(scenes)
        dx, dy = rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)
        images[i] = np.asarray(draw(scene, dx, dy))
        captions.append(scene.caption(rng.random() >= drop, rng.random() >= drop))
    return images, captions
