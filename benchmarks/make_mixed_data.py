"""Write an interleaved-format parquet of mixed samples: most text only, some with 1-3 images of different sizes.

The data pipeline deals one global, shuffled order of samples to all ranks, so every rank sees a mix. Samples are
long (hundreds of tokens) so a packed micro-batch holds only a few of them: at some steps one rank's batch has no
image at all while another's has several, of different sizes, and ranks get different numbers of images. That is
the case that must neither hang (FSDP2, ZeRO-3) nor mismatch a collective.

    python benchmarks/make_mixed_data.py OUT.parquet [--samples 4000] [--image_fraction 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import Dataset, Features, Image, List, Value

from processing.scenes import ScenesSource

FILLER = tuple("the quick brown fox jumps over the lazy dog while a red box and a blue box sit side by side".split(" "))


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def filler_text(rng: np.random.Generator, words: int) -> str:
    return " ".join(FILLER[i] for i in rng.integers(0, len(FILLER), size=words))


def write_mixed_parquet(path: str, samples: int = 4000, image_fraction: float = 0.3, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    scenes = ScenesSource("train", samples * 3, seed)
    texts, images = [], []
    for index in range(samples):
        if rng.random() >= image_fraction:
            texts.append([f"no image here: {filler_text(rng, int(rng.integers(60, 300)))}"])
            images.append([None])
            continue
        sample_texts, sample_images = [], []
        for slot in range(int(rng.integers(1, 4))):
            scene = scenes[index * 3 + slot]
            scale = float(rng.choice([1.0, 2.0, 3.0]))  # images of different sizes, hence patch counts
            image = scene["images"][0]
            image = image.resize((int(image.width * scale), int(image.height * scale)))
            sample_texts += [None, scene["text"].split("|>")[-1] + " " + filler_text(rng, int(rng.integers(10, 80)))]
            sample_images += [{"bytes": png_bytes(image), "path": None}, None]
        texts.append(sample_texts)
        images.append(sample_images)
    features = Features({"texts": List(Value("string")), "images": List(Image())})
    Dataset.from_dict({"texts": texts, "images": images}, features=features).to_parquet(path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--image_fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_mixed_parquet(args.path, args.samples, args.image_fraction, args.seed))
