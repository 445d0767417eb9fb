"""`scenes`: the embedded default data set, drawn in-process, deterministic by seed, never downloaded.

Each image shows two filled squares, one in each half, of two different palette colours, on a background whose
channels are each drawn from 90-170. The caption names them left to right: "a red box and a blue box". A model
can only get the caption right by looking at the image, which is what the default training run checks.

Example `i` of a split is drawn from its own random stream, seeded by (split, seed, i): examples are independent,
so any of them can be drawn directly (workers and resume need no replay), and the train and eval streams never
overlap.

For the trainer:
    ScenesSource("train", size, seed)[i] -> {"images": [PIL.Image, ...], "text": "<|image|>a red box and a blue box"}
    scenes_eval_examples(count, seed)     -> [([PIL.Image], "a red box and a blue box"), ...] for exact-match eval
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .tokenizer import IMAGE_TOKEN

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES = tuple(PALETTE)
WIDTHS = (64, 112)  # inclusive ranges, in pixels
HEIGHTS = (32, 64)
BACKGROUND_CHANNEL = (90, 170)
BOX_SIDE_FRACTION = (0.44, 0.80)  # of min(half width, height)
SPLIT_STREAMS = {"train": 0, "eval": 1}


def scene_caption(left: str, right: str) -> str:
    return f"a {left} box and a {right} box"


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image with a box in each half, and its caption."""
    width = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
    height = int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    background = rng.integers(BACKGROUND_CHANNEL[0], BACKGROUND_CHANNEL[1] + 1, size=3)
    pixels_HWC = np.empty((height, width, 3), dtype=np.uint8)
    pixels_HWC[:] = background
    left, right = (COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
    halves = ((0, width // 2), (width // 2, width - width // 2))  # (start, width) of each half
    for colour, (half_start, half_width) in zip((left, right), halves):
        side = max(1, round(rng.uniform(*BOX_SIDE_FRACTION) * min(half_width, height)))
        x = half_start + int(rng.integers(0, half_width - side + 1))
        y = int(rng.integers(0, height - side + 1))
        pixels_HWC[y : y + side, x : x + side] = PALETTE[colour]
    return Image.fromarray(pixels_HWC), scene_caption(left, right)


def _stream(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLIT_STREAMS:
        raise ValueError(f"scenes has splits {sorted(SPLIT_STREAMS)}, not {split!r}")
    return np.random.default_rng([SPLIT_STREAMS[split], seed, index])


class ScenesSource(Sequence):
    """A split of `scenes` as a sequence of raw examples: text with image placeholders, and the images.

    A share of examples (`interleaved_share`, 20 % by default) hold two scenes, each followed by its caption,
    so that packing meets samples with several images. The others are `image_token` followed by the caption.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 100_000,
        seed: int = 0,
        interleaved_share: float = 0.2,
        image_token: str = IMAGE_TOKEN,
    ):
        _stream(split, seed, 0)  # fail on a bad split name now, not in a worker
        self.split, self.size, self.seed = split, size, seed
        self.interleaved_share, self.image_token = interleaved_share, image_token

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"scenes {self.split} has {self.size} examples; there is no example {index}")
        rng = _stream(self.split, self.seed, index)
        scene_count = 2 if rng.random() < self.interleaved_share else 1
        images, text = [], ""
        for _ in range(scene_count):
            image, caption = draw_scene(rng)
            images.append(image)
            text += self.image_token + caption
        return {"images": images, "text": text}


def scenes_eval_examples(count: int = 200, seed: int = 0) -> list[tuple[list[Image.Image], str]]:
    """Held-out single-scene examples as (images, caption), for greedy-generation exact-match evaluation."""
    source = ScenesSource("eval", count, seed, interleaved_share=0.0)
    examples = []
    for index in range(count):
        example = source[index]
        examples.append((example["images"], example["text"].removeprefix(source.image_token)))
    return examples
