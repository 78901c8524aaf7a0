"""Synthetic shapes: a seeded, deterministic captioning / VQA / retrieval data set drawn with Pillow.

Every image holds one shape (circle, square, triangle, diamond) of one colour and size at one place
(left, right, top, bottom) on a plain light background, with small random jitter. Each row of the
data set carries a caption from a small grammar and one question with its one-word answer::

    a small red circle on the left            what color is the circle ?          -> red
    a large blue square at the top            what shape is the blue object ?     -> square
                                              where is the green triangle ?       -> left
                                              how big is the yellow diamond ?     -> small

``write_dataset(out, n_train, n_test, seed)`` writes Hugging Face's ``imagefolder`` layout:
``out/train/*.png`` and ``out/test/*.png`` with a ``metadata.jsonl`` each (``file_name``, ``text``,
``question``, ``answer``). The same seed gives the same bytes; the test split uses its own stream
of the seed, so no test image is a training image. ``VOCAB`` (bundled as
``assets/synthetic_vocab.txt``) covers every word the grammar can say.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from blip_core.generation import integer_option

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0)}
SIZES = {"small": (6, 8), "large": (12, 14)}              # half-width in pixels on a 64x64 canvas
PLACES = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}   # centre before jitter
PLACE_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 238, 220), (225, 235, 245))
QUESTIONS = ("color", "shape", "where", "size")
IMAGE_SIZE = 64
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = SPECIAL + tuple(sorted(
    {"a", "on", "the", "at", "what", "color", "is", "shape", "object", "where", "how", "big", "?"}
    | set(SHAPES) | set(COLORS) | set(SIZES) | set(PLACES)))
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "synthetic_vocab.txt")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    place: str
    background: int     # index into BACKGROUNDS
    dx: int             # jitter of the centre, pixels
    dy: int
    radius: int

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {PLACE_PHRASE[self.place]}"

    def question(self, kind: str) -> tuple[str, str]:
        """The question of ``kind`` (one of ``QUESTIONS``) about this scene and its answer."""
        if kind == "color":
            return f"what color is the {self.shape} ?", self.color
        if kind == "shape":
            return f"what shape is the {self.color} object ?", self.shape
        if kind == "where":
            return f"where is the {self.color} {self.shape} ?", self.place
        if kind == "size":
            return f"how big is the {self.color} {self.shape} ?", self.size
        raise ValueError(f"unknown question kind {kind!r}; choose one of {QUESTIONS}")


def random_scene(rng: np.random.Generator) -> Scene:
    size = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size]
    return Scene(shape=str(rng.choice(SHAPES)), color=str(rng.choice(list(COLORS))), size=size,
                 place=str(rng.choice(list(PLACES))), background=int(rng.integers(len(BACKGROUNDS))),
                 dx=int(rng.integers(-3, 4)), dy=int(rng.integers(-3, 4)), radius=int(rng.integers(lo, hi + 1)))


def render(scene: Scene, size: int = IMAGE_SIZE):
    """The scene as an RGB ``PIL.Image`` of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = PLACES[scene.place]
    cx, cy, r = cx + scene.dx, cy + scene.dy, scene.radius
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:   # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image if size == IMAGE_SIZE else image.resize((size, size), Image.BICUBIC)


def scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` scenes drawn from the seed's stream for ``split`` (splits never share a stream)."""
    stream = {"train": 0, "test": 1, "samples": 2}[split]
    rng = np.random.default_rng([seed, stream])
    return [random_scene(rng) for _ in range(n)]


def rows(n: int, seed: int, split: str = "train") -> list[tuple[Scene, dict]]:
    """``(scene, metadata row)`` pairs; the question kind cycles through ``QUESTIONS`` by a seeded draw."""
    rng = np.random.default_rng([seed, 10 + {"train": 0, "test": 1, "samples": 2}[split]])
    out = []
    for i, scene in enumerate(scenes(n, seed, split)):
        question, answer = scene.question(QUESTIONS[int(rng.integers(len(QUESTIONS)))])
        out.append((scene, {"file_name": f"{i:05d}.png", "text": scene.caption, "question": question,
                            "answer": answer}))
    return out


def write_split(directory: str, n: int, seed: int, split: str) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metadata.jsonl"), "w", encoding="utf-8") as fh:
        for scene, row in rows(n, seed, split):
            render(scene).save(os.path.join(directory, row["file_name"]), optimize=False)
            fh.write(json.dumps(row) + "\n")
    return directory


def write_dataset(out: str, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> str:
    """Write ``out/train`` and ``out/test`` in the ``imagefolder`` layout; returns ``out``."""
    n_train, n_test = integer_option(n_train, "n_train"), integer_option(n_test, "n_test")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    write_split(os.path.join(out, "train"), n_train, seed, "train")
    write_split(os.path.join(out, "test"), n_test, seed, "test")
    return out


def write_vocab(path: str = VOCAB_FILE) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(VOCAB) + "\n")
    return path


if __name__ == "__main__":
    import sys
    write_dataset(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
