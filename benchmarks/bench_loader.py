"""Samples per second through the training data loader with 0, 1 and 2 workers, on scenes and on photos.

Each run reads a fixed set of examples once (decode, resize, patchify, tokenize, pack, collate) and reports
samples/s over the whole run, from building the loader to its last batch, and the time to the first batch (worker
start-up and the first fill of the packing buffer). Each figure is the best of `--repeats` runs, because a shared
2-core machine is rarely quiet for a whole run. It also reports the CPU time per sample spent in the training
process and in the workers, which other load on the machine hardly changes: what workers buy is the first.

- scenes: the embedded set with the default run's processor (patch 8, merge 2, 16-128 patches), seq_len 512,
  2 rows per batch;
- photos: the photos shipped with scikit-image (`skimage.data`: astronaut, coffee, chelsea, rocket, the grayscale
  camera, the RGBA logo, retina, ...) as encoded files in a parquet caption data set, with a SigLIP2-base-like
  processor (patch 16, merge 2, up to 256 patches as siglip2-base-patch16-naflex), seq_len 2048, 8 rows per batch.

    python benchmarks/bench_loader.py [--scenes 2000] [--photos 1000] [--workers 0 1 2] [--repeats 3]

Headroom for a training config (`--config`): batches per second the loader makes with K workers, for that config's
processor (patch size, merge, patch budget), rows and seq_len, on `--data_files` (e.g. the shards of
`make_image_data.py`), divided by the micro-batches per second one training process consumes (`--train-steps-per-s`,
the lead's measured optimizer steps per second per process, times the config's gradient accumulation). A headroom of
2 or more leaves room for slow images; below 1 the GPU waits for data.

    python benchmarks/bench_loader.py --config examples/configs/bench_1b_images.yaml \
        --data_files '/tmp/images/images-*.parquet' --workers 2 4 8 --batches 40 --train-steps-per-s 1.5
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data

from processing import Llama3Siglip2ImageProcessor, Llama3Siglip2Processor, build_byte_level_bpe_tokenizer
from processing.data import DataConfig, build_train_dataloader
from processing.scenes import COLOUR_NAMES, scene_caption

PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "camera.png",
    "logo.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "coins.png",
)


def make_processor(patch_size: int, max_patches: int, min_patches: int = 1, merge: int = 2) -> Llama3Siglip2Processor:
    corpus = [scene_caption(a, b) for a in COLOUR_NAMES for b in COLOUR_NAMES] + ["a photo of " + p for p in PHOTOS]
    tokenizer = build_byte_level_bpe_tokenizer(corpus, vocab_size=400)
    image_processor = Llama3Siglip2ImageProcessor(
        patch_size=patch_size, merge_size=merge, min_patches=min_patches, max_patches=max_patches
    )
    return Llama3Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def photos_parquet(folder: str, count: int) -> str:
    photo_dir = os.path.dirname(skimage.data.__file__)
    encoded = []
    for name in PHOTOS:
        with open(os.path.join(photo_dir, name), "rb") as file:
            encoded.append(file.read())
    table = pa.Table.from_pydict(
        {
            "jpg": [encoded[i % len(PHOTOS)] for i in range(count)],
            "txt": [f"a photo of {PHOTOS[i % len(PHOTOS)]}, number {i}" for i in range(count)],
        }
    )
    path = os.path.join(folder, "photos.parquet")
    pq.write_table(table, path)
    return path


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(config: DataConfig, processor, seq_len: int) -> tuple[float, float, int, float, float]:
    """(seconds to the first batch, samples/s, samples, CPU ms per sample in this process and in the workers)."""
    start, own, workers = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    loader = build_train_dataloader(config, processor, seq_len)
    batches = iter(loader)
    next(batches)
    first_batch_after = time.perf_counter() - start
    for _ in batches:
        pass  # the workers exit (and are counted as children) when the loader is exhausted
    samples = loader.samples_seen
    own = (cpu_seconds(resource.RUSAGE_SELF) - own) / samples * 1e3
    workers = (cpu_seconds(resource.RUSAGE_CHILDREN) - workers) / samples * 1e3
    return first_batch_after, samples / (time.perf_counter() - start), samples, own, workers


def config_headroom(args) -> None:
    """Batches/s for the config's data section with each worker count, and the headroom over training's demand."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from train_lib.arguments import read_config

    values = read_config(args.config)
    processor = make_processor(values.get("patch_size", 8), values.get("max_patches") or 256,
                               values.get("min_patches") or 1, values.get("spatial_merge_size") or 1)
    seq_len, accumulation = values.get("seq_len", 512), values.get("gradient_accumulation_steps", 1)
    demand = args.train_steps_per_s * accumulation if args.train_steps_per_s else None
    print(f"{os.cpu_count()} CPU cores; {args.config}: seq_len {seq_len}, {values.get('rows_per_batch', 4)} rows, "
          f"merge {values.get('spatial_merge_size') or 1}, patch budget {values.get('max_patches')}")
    print("| workers | first batch after | batches/s | headroom |\n|---:|---:|---:|---:|")
    for workers in args.workers:
        config = DataConfig(dataset="parquet", data_files=args.data_files, format=values.get("data_format", "auto"),
                            image_column=values.get("image_column"), text_column=values.get("text_column"),
                            rows_per_batch=values.get("rows_per_batch", 4), num_workers=workers)
        start = time.perf_counter()
        batches = iter(build_train_dataloader(config, processor, seq_len))
        next(batches)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        rate = args.batches / (time.perf_counter() - start)
        del batches  # stops the workers
        headroom = f"{rate / demand:.1f}" if demand else "-"
        print(f"| {workers} | {first:.1f} s | {rate:.2f} | {headroom} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", help="a training YAML: measure its loader's headroom on --data_files instead")
    parser.add_argument("--data_files", help="with --config: the parquet files (a glob)")
    parser.add_argument("--batches", type=int, default=40, help="with --config: batches timed after the first")
    parser.add_argument("--train-steps-per-s", type=float, default=None,
                        help="with --config: optimizer steps per second of one training process, measured on the GPU")
    args = parser.parse_args()
    if args.config:
        if not args.data_files:
            parser.error("--config needs --data_files")
        return config_headroom(args)

    with tempfile.TemporaryDirectory() as folder:
        cases = [
            (
                "scenes",
                DataConfig(dataset="scenes", scenes_size=args.scenes, rows_per_batch=2, num_epochs=1),
                make_processor(8, 128, min_patches=16),
                512,
            ),
            (
                "skimage.data photos",
                DataConfig(
                    dataset="parquet",
                    data_files=photos_parquet(folder, args.photos),
                    rows_per_batch=8,
                    num_epochs=1,
                    cache_dir=os.path.join(folder, "cache"),
                ),
                make_processor(16, 256),
                2048,
            ),
        ]
        print(f"{os.cpu_count()} CPU cores\n")
        print(
            "| data | workers | samples | first batch after | samples/s | CPU ms/sample: training process | workers |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, config, processor, seq_len in cases:
            for workers in args.workers:
                config.num_workers = workers
                first, rate, samples, own, in_workers = max(
                    (measure(config, processor, seq_len) for _ in range(args.repeats)), key=lambda run: run[1]
                )
                print(
                    f"| {name} | {workers} | {samples} | {first:.2f} s | {rate:,.0f} | {own:.2f} | {in_workers:.2f} |"
                )


if __name__ == "__main__":
    main()
