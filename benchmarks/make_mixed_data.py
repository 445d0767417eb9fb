"""Write an interleaved-format parquet whose first half has images and whose second half is text only.

`split_dataset_by_node` gives each rank a contiguous part, so on 2 processes rank 0 sees only image samples and
rank 1 only text: the case where one rank has no image while another has several, which must not hang FSDP or
ZeRO-3 (the model runs its vision tower on a blank image then, with a zero contribution).

    python benchmarks/make_mixed_data.py OUT.parquet [--samples 2000]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import Dataset, Features, Image, List, Value

from processing.scenes import ScenesSource


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mixed_parquet(path: str, samples: int = 2000, seed: int = 0) -> str:
    scenes = ScenesSource("train", samples, seed)
    texts, images = [], []
    for index in range(samples):
        example = scenes[index]
        caption = example["text"].split("|>")[-1]
        if index < samples // 2:
            texts.append([None, caption])
            images.append([{"bytes": png_bytes(example["images"][0]), "path": None}, None])
        else:
            texts.append([f"no image here: {caption}"])
            images.append([None])
    features = Features({"texts": List(Value("string")), "images": List(Image())})
    Dataset.from_dict({"texts": texts, "images": images}, features=features).to_parquet(path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    print(write_mixed_parquet(args.path, args.samples))
