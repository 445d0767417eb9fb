"""Images per second of our image processor against transformers' `Siglip2ImageProcessorPil`, on one CPU core.

Both get the same `skimage.data` photos as PIL images (as a dataset hands them over) and the same patch budget, one
image per call, as a data-loader worker sees them. SigLIP2 always resizes an image to fill `max_num_patches`; ours
keeps the native resolution within the budget (see `smart_resize`), so the patch counts are printed too.

Run: python benchmarks/bench_image_processor.py [--budgets 256 1024] [--seconds 4] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from PIL import Image
from skimage import data
from transformers import Siglip2ImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from processing import Llama3Siglip2ImageProcessor

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "logo", "camera", "retina")


def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(data, name)()) for name in PHOTOS]


def images_per_second(process, images: list[Image.Image], seconds: float) -> float:
    """One timed round of at least `seconds`, one image per call."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for image in images:
            process(image)
        done += len(images)
    return done / elapsed


def best_rates(processes: dict, images: list[Image.Image], seconds: float, rounds: int) -> dict[str, float]:
    """Best round of each, the rounds interleaved so that load from other processes hits both alike."""
    for process in processes.values():
        process(images[0])  # warm-up: first-call imports and caches
    best = dict.fromkeys(processes, 0.0)
    for _ in range(rounds):
        for name, process in processes.items():
            best[name] = max(best[name], images_per_second(process, images, seconds / rounds))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--seconds", type=float, default=4.0, help="per processor and budget")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = photos()

    print(f"{len(images)} skimage.data photos ({', '.join(PHOTOS)}), one core, one image per call")
    print(f"{'max patches':>11} | {'ours img/s':>10} | {'SigLIP2 img/s':>13} | {'speed-up':>8} | "
          f"{'ours patches':>12} | {'SigLIP2 patches':>15}")
    for budget in args.budgets:
        ours = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=budget)
        reference = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=budget, do_convert_rgb=True)
        rates = best_rates(
            {
                "ours": lambda image: ours(image, return_tensors="pt"),
                "reference": lambda image: reference(image, return_tensors="pt"),
            },
            images,
            args.seconds,
            args.rounds,
        )
        ours_rate, reference_rate = rates["ours"], rates["reference"]
        ours_patches = sum(int(ours(image, return_tensors="pt")["pixel_attention_mask"].sum()) for image in images)
        reference_patches = sum(int(reference(image, return_tensors="pt")["pixel_attention_mask"].sum()) for image in images)
        print(f"{budget:>11} | {ours_rate:>10.1f} | {reference_rate:>13.1f} | {ours_rate / reference_rate:>7.2f}x | "
              f"{ours_patches:>12} | {reference_patches:>15}")


if __name__ == "__main__":
    main()
