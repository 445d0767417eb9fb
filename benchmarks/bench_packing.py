"""Packing efficiency on a caption-like length distribution: our packing buffer against the seed's packer and padding.

Every method sees the same samples in the same order: one image of 64-256 tokens plus 8-80 text tokens each
(`--two_image_share` of them carry a second image), rows of 2048 tokens, 8 rows per batch. Efficiency is real
tokens / (R * S) summed over all batches; image-slot use is images / max_images over all batches.

    python benchmarks/bench_packing.py [--samples 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from processing.data.packing import PackingBuffer

SEQ_LEN = 2048
ROWS = 8


def caption_like_samples(count: int, seed: int, two_image_share: float) -> list[tuple[int, int]]:
    """(tokens, images) per sample."""
    rng = np.random.default_rng(seed)
    images = 1 + (rng.random(count) < two_image_share)
    image_tokens = sum(rng.integers(64, 257, count) * (images > k) for k in range(2))
    text_tokens = rng.integers(8, 81, count)
    return list(zip((image_tokens + text_tokens).tolist(), images.tolist()))


def ours(samples, max_images=None):
    """Stream through the packing buffer as the data pipeline does; returns rows used per batch and images."""
    buffer = PackingBuffer(SEQ_LEN, ROWS, max_images=max_images)
    batches = []

    def take():
        rows = buffer.take()
        batches.append((len(rows), sum(s.images for row in rows for s in row)))

    for key, (length, images) in enumerate(samples):
        buffer.add(key, length, images)
        while buffer.ready():
            take()
    while len(buffer):
        take()
    return batches


def sort_then_greedy(samples, buffer_size=100):
    """The seed's method: every 100 samples, sort longest first and close a row when the next one does not fit."""
    rows = []
    for start in range(0, len(samples), buffer_size):
        current = 0
        for length, _ in sorted(samples[start : start + buffer_size], reverse=True):
            if current and current + length > SEQ_LEN:
                rows.append(current)
                current = 0
            current += length
        rows.append(current)  # the last, partly filled row of each buffer is emitted as it is
    return len(rows)


def padded_rows_to_longest(samples):
    """One sample per row, each batch of 8 rows padded to its longest sample: total row tokens."""
    lengths = [length for length, _ in samples]
    return sum(len(lengths[i : i + ROWS]) * max(lengths[i : i + ROWS]) for i in range(0, len(lengths), ROWS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{args.samples} samples, seq_len {SEQ_LEN}, {ROWS} rows per batch\n")
    print("| samples | method | rows | token efficiency | image-slot use |")
    print("|---|---|---:|---:|---:|")
    for two_image_share, max_images in ((0.0, None), (0.2, 96)):
        samples = caption_like_samples(args.samples, args.seed, two_image_share)
        real = sum(length for length, _ in samples)
        label = "1 image each" if not two_image_share else f"{two_image_share:.0%} with 2 images"
        start = time.perf_counter()
        batches = ours(samples, max_images)
        seconds = time.perf_counter() - start
        rows = sum(r for r, _ in batches)
        slot_use = "-" if max_images is None else f"{sum(n for _, n in batches) / (len(batches) * max_images):.1%}"
        budget = "" if max_images is None else f", max_images {max_images}"
        print(
            f"| {label} | ours: packing buffer, best-fit decreasing{budget} ({seconds / len(samples) * 1e6:.0f} µs"
            f"/sample) | {rows} | {real / (rows * SEQ_LEN):.2%} | {slot_use} |"
        )
        rows = sort_then_greedy(samples)
        print(f"| {label} | seed: sort-then-greedy, buffer 100 | {rows} | {real / (rows * SEQ_LEN):.2%} | - |")
        print(
            f"| {label} | padding, one sample per row, to the batch's longest | {len(samples)} | "
            f"{real / padded_rows_to_longest(samples):.2%} | - |"
        )
        print(
            f"| {label} | padding, one sample per row, to seq_len | {len(samples)} | "
            f"{real / (len(samples) * SEQ_LEN):.2%} | - |"
        )


if __name__ == "__main__":
    main()
