"""Write a caption-format parquet data set of real-sized encoded photos, for multi-GPU throughput runs.

Each sample is an encoded image (`image`: JPEG or PNG bytes) and a caption (`caption`), the columns the data
pipeline's caption format finds by itself. The images are crops of the photos scikit-image ships (`skimage.data`:
astronaut, coffee, chelsea, rocket, retina, the Hubble deep field, ...), each cut at a random aspect ratio (1:3 to
3:1), resized so its long side is 384-1536 px, and re-encoded: 85 % JPEG at quality 80-95, 15 % PNG (long side at
most 1024, as photos stored losslessly are rarely larger), so decoding costs what web data costs. A pool of
`--distinct` images is encoded once and sampled with replacement, which keeps writing fast; the loader decodes each
sample anew all the same. Captions mix short alt-text-like lines (8-30 words, 70 %) and dense descriptions (60-200
words, 30 %).

    python benchmarks/make_image_data.py /tmp/images [--samples 20000] [--shard-size 2000] [--distinct 256]

prints the shard glob to pass as `--data_files` (with `--dataset parquet --data_format caption`).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "ihc.png", "color.png", "camera.png", "coins.png",
          "brick.png", "grass.png", "gravel.png", "cell.png", "moon.png", "logo.png")
WORDS = {
    "adjective": ["red", "small", "large", "wooden", "bright", "dark", "old", "modern", "quiet", "busy", "blue", "green", "soft", "sharp", "tall", "narrow", "wide", "smooth", "rough", "golden", "pale", "distant", "crowded", "empty", "shiny"],
    "noun": ["cat", "dog", "street", "building", "window", "table", "person", "car", "bicycle", "tree", "river", "mountain", "sky", "cup", "book", "door", "road", "field", "flower", "bird", "boat", "bridge", "lamp", "wall", "chair", "rocket", "planet", "cell", "coin"],
    "verb": ["stands", "sits", "rests", "lies", "leans", "waits", "shines", "hangs", "grows", "moves"],
    "preposition": ["on", "near", "beside", "under", "behind", "above", "across", "inside", "along"],
}
SCHEMA = pa.schema([("image", pa.binary()), ("caption", pa.string())])


def photo_pool(rng: random.Random, count: int) -> list[bytes]:
    folder = os.path.dirname(skimage.data.__file__)
    photos = [Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS]
    pool = []
    for _ in range(count):
        photo = rng.choice(photos)
        W, H = photo.size
        aspect = 3 ** rng.uniform(-1, 1)  # width / height, 1:3 to 3:1
        w = min(W, round(H * aspect))
        h = min(H, round(w / aspect))
        left, top = rng.randint(0, W - w), rng.randint(0, H - h)
        crop = photo.crop((left, top, left + w, top + h))
        png = rng.random() < 0.15
        long_side = rng.randint(384, 1024 if png else 1536)
        scale = long_side / max(w, h)
        image = crop.resize((max(16, round(w * scale)), max(16, round(h * scale))), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        if png:
            image.save(buffer, format="PNG", compress_level=rng.randint(1, 6))
        else:
            image.save(buffer, format="JPEG", quality=rng.randint(80, 95))
        pool.append(buffer.getvalue())
    return pool


def sentence(rng: random.Random) -> list[str]:
    pick = lambda kind: rng.choice(WORDS[kind])
    words = ["a", pick("adjective"), pick("noun"), pick("verb"), pick("preposition"), "the", pick("adjective"),
             pick("noun")]
    if rng.random() < 0.5:
        words += ["with", "a", pick("adjective"), pick("noun")]
    return words


def caption(rng: random.Random) -> str:
    target = rng.randint(8, 30) if rng.random() < 0.7 else rng.randint(60, 200)
    words: list[str] = []
    sentences = []
    while len(words) < target:
        s = sentence(rng)
        words += s
        sentences.append(" ".join(s).capitalize() + ".")
    return " ".join(sentences)


def write_image_data(folder: str, samples: int = 20000, shard_size: int = 2000, distinct: int = 256,
                     seed: int = 0) -> str:
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    pool = photo_pool(rng, distinct)
    for shard, start in enumerate(range(0, samples, shard_size)):
        rows = range(start, min(samples, start + shard_size))
        table = pa.Table.from_pydict({"image": [rng.choice(pool) for _ in rows],
                                      "caption": [caption(rng) for _ in rows]}, schema=SCHEMA)
        # Row groups of 100 samples: a streaming reader holds little, and shards split evenly across ranks.
        pq.write_table(table, os.path.join(folder, f"images-{shard:05d}.parquet"), row_group_size=100,
                       compression="none")
    return os.path.join(folder, "images-*.parquet")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=256, help="distinct encoded images, sampled with replacement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    pattern = write_image_data(args.folder, args.samples, args.shard_size, args.distinct, args.seed)
    size = sum(os.path.getsize(os.path.join(args.folder, f)) for f in os.listdir(args.folder) if f.endswith(".parquet"))
    print(f"{args.samples} samples, {size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s: {pattern}")


if __name__ == "__main__":
    main()
