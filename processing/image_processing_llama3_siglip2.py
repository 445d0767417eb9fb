"""Native-resolution image processor: SigLIP2 NaFlex patches of an image resized to a patch budget.

Each image keeps its aspect ratio and (within the budget) its resolution: `smart_resize` picks a size whose sides
are multiples of `patch_size * merge_size`, then the image is cut into `patch_size`² patches in raster order, each
flattened as (ph, pw, c) and normalised with the vision checkpoint's mean and std, exactly what a pretrained SigLIP2
was trained on. With `merge_size` k > 1 both sides hold a multiple of k patches, and the model merges each k×k block
(found from `spatial_shapes`) into one image token.

Shape letters:
    N  images in the batch
    L  patches per image after padding (`max_patches`, or the longest image with `padding="longest"`)
    D  values per patch, 3 * patch_size²
    H, W, C  height, width and channels of one image in pixels

This file travels to the Hub with the processor: it imports only numpy, torch, PIL, transformers and its sibling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_loading import MAX_IMAGE_PIXELS, InvalidImageError, load_image

MAX_ASPECT_RATIO = 200
# SigLIP2 normalises to [-1, 1]; a checkpoint that differs ships its own values in its preprocessor config.
SIGLIP2_MEAN = (0.5, 0.5, 0.5)
SIGLIP2_STD = (0.5, 0.5, 0.5)
PADDING_STRATEGIES = ("max_length", "longest")


def smart_resize(height: int, width: int, factor: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """The (height, width) to resize an image to: multiples of `factor`, aspect ratio kept, area within budget.

    `min_patches` and `max_patches` count factor×factor cells. The image keeps its own resolution, each side
    rounded to the nearest multiple of `factor`, when that gives between `min_patches` and `max_patches` cells;
    otherwise it is scaled, keeping its aspect ratio, to just inside the nearer bound. A side is never shorter than
    one `factor` (a 1×1 image becomes factor×factor). Raises `InvalidImageError` (a `ValueError`) when the aspect
    ratio is over 200.

    This is Qwen2-VL's `smart_resize`, with three differences:
    - the budget counts cells, not pixels, because the vision tower's cost and its position grid are in patches;
    - it works in exact integer arithmetic, so a valid size maps to itself and an exact fit (1024×1024 into
      256 cells of 64) is not lost to a float sqrt landing just below an integer;
    - a side clamped to one cell can leave the other side over budget (Qwen2-VL then exceeds `max_pixels`); ours
      shortens the long side to fit. `max_patches` must be at least 4 × `min_patches`: rounding both sides to whole
      cells can change the area by up to 4× for the smallest grids, and the slack is what makes both bounds hold.
    """
    if height < 1 or width < 1:
        raise InvalidImageError(f"image size {height}x{width} is empty")
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    if min_patches < 1 or max_patches < 4 * min_patches:
        raise ValueError(
            f"the budget must satisfy 1 <= min_patches and 4 * min_patches <= max_patches, "
            f"got min_patches={min_patches}, max_patches={max_patches}"
        )
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InvalidImageError(
            f"image size {height}x{width} has an aspect ratio of {max(height, width) / min(height, width):.1f}, "
            f"over the limit of {MAX_ASPECT_RATIO}"
        )
    # Cells along each side: the nearest whole number at native resolution (round half up).
    rows = max(1, (2 * height + factor) // (2 * factor))
    cols = max(1, (2 * width + factor) // (2 * factor))
    if rows * cols > max_patches:
        # Scale to area `max_patches`: rows = sqrt(max_patches * height / width), rounded down.
        rows = max(1, math.isqrt(max_patches * height // width))
        cols = max(1, math.isqrt(max_patches * width // height))
    elif rows * cols < min_patches:
        # Scale to area `min_patches`, rounded up: ceil(sqrt(x)) = isqrt(ceil(x) - 1) + 1.
        rows = max(1, math.isqrt(-(-min_patches * height // width) - 1) + 1)
        cols = max(1, math.isqrt(-(-min_patches * width // height) - 1) + 1)
    if rows * cols > max_patches:
        # Only when the short side was clamped to one cell: the long side is then shortened to fit.
        if rows >= cols:
            rows = max_patches // cols
        else:
            cols = max_patches // rows
    return rows * factor, cols * factor


def patchify(pixels_HWC: np.ndarray, patch_size: int, scale_D: np.ndarray, offset_D: np.ndarray, out_LD: np.ndarray):
    """Write the patches of `pixels_HWC` into `out_LD[:n]`, raster order, each flattened (ph, pw, c) and normalised.

    `scale_D` and `offset_D` hold the per-channel multiply-add repeated for every pixel of a patch: with rows of D
    values numpy runs one long inner loop, where broadcasting a (C,) vector makes it run n·p² loops of 3.
    """
    H, W, C = pixels_HWC.shape
    h, w, p = H // patch_size, W // patch_size, patch_size
    # The uint8 copy made by this reshape is a quarter the size of the float32 output; the multiply then streams.
    patches_nD = pixels_HWC.reshape(h, p, w, p, C).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * C)
    target_nD = out_LD[: h * w]
    np.multiply(patches_nD, scale_D, out=target_nD)
    np.add(target_nD, offset_D, out=target_nD)


class Llama3Siglip2ImagesKwargs(ImagesKwargs, total=False):
    """The settings `from_pretrained(folder, **overrides)` may override, beyond transformers' own."""

    patch_size: int
    merge_size: int
    min_patches: int
    max_patches: int
    max_image_pixels: int
    padding: str


class Llama3Siglip2ImageProcessor(BaseImageProcessor):
    r"""Images to SigLIP2 NaFlex inputs at (close to) native resolution.

    Args:
        patch_size: side of a SigLIP2 patch in pixels.
        merge_size: k; the model merges each k×k block of patches into one token, so both sides hold a multiple of k
            patches.
        min_patches, max_patches: budget per image in patches, before the merge. Images are resized only as far as
            needed to fit it (see `smart_resize`); `max_patches` is also the padded length L by default.
        image_mean, image_std: per-channel normalisation; SigLIP2's 0.5 / 0.5 by default.
        resample: the PIL filter used for resizing.
        max_image_pixels: larger images are refused before decoding (see `load_image`).

    Returns (`__call__`), a `BatchFeature` with `pixel_values (N, L, D)` float32, `pixel_attention_mask (N, L)`
    int32 (1 = real patch), `spatial_shapes (N, 2)` int64 (patch rows, patch columns) and `grid_thw (N, L, 3)` int64
    (0, row, column) of each patch, -1 on padding.
    """

    model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
    valid_kwargs = Llama3Siglip2ImagesKwargs

    def __init__(
        self,
        patch_size: int = 16,
        merge_size: int = 1,
        min_patches: int = 1,
        max_patches: int = 256,
        image_mean: Sequence[float] = SIGLIP2_MEAN,
        image_std: Sequence[float] = SIGLIP2_STD,
        resample: int = Image.Resampling.BILINEAR,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.min_patches = min_patches
        self.max_patches = max_patches
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.resample = int(resample)
        self.max_image_pixels = max_image_pixels
        _cell_budget(patch_size, merge_size, min_patches, max_patches)  # fail at construction, not on first image

    def num_image_tokens(self, spatial_shapes: Any, merge_size: int | None = None) -> list[int]:
        """Tokens each image takes in the text, after the k×k merge: (rows / k) * (columns / k)."""
        k = self.merge_size if merge_size is None else merge_size
        shapes = np.asarray(spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)
        return [int(rows // k) * int(cols // k) for rows, cols in shapes.reshape(-1, 2)]

    def fetch_images(self, images: Any) -> Any:
        # transformers' default fetches URLs; ours never does (see `load_image`). Decoding happens in `preprocess`.
        return images

    def preprocess(
        self,
        images: Any,
        *,
        patch_size: int | None = None,
        merge_size: int | None = None,
        min_patches: int | None = None,
        max_patches: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resample: int | None = None,
        padding: str = "max_length",
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Process one image or a list (possibly nested per sample; flattened in order) of images.

        Any argument left as None takes the processor's own value. `padding="max_length"` pads every image to
        `max_patches` patches; `padding="longest"` to the longest image in the batch. `return_tensors="pt"` gives
        torch tensors, otherwise numpy arrays.
        """
        p = self.patch_size if patch_size is None else patch_size
        k = self.merge_size if merge_size is None else merge_size
        max_patches = self.max_patches if max_patches is None else max_patches
        min_patches = self.min_patches if min_patches is None else min_patches
        min_cells, max_cells = _cell_budget(p, k, min_patches, max_patches)
        if padding not in PADDING_STRATEGIES:
            raise ValueError(f"padding must be one of {PADDING_STRATEGIES}, got {padding!r}")
        mean_C = np.asarray(image_mean if image_mean is not None else self.image_mean, dtype=np.float32)
        std_C = np.asarray(image_std if image_std is not None else self.image_std, dtype=np.float32)
        # (x / 255 - mean) / std as one multiply-add, repeated for each of the p² pixels of a patch.
        scale_D, offset_D = np.tile(1.0 / (255.0 * std_C), p * p), np.tile(-mean_C / std_C, p * p)
        resample = self.resample if resample is None else resample

        pixels = []
        for image in _flatten_images(images):
            image = load_image(image, max_pixels=self.max_image_pixels)
            height, width = smart_resize(image.height, image.width, p * k, min_cells, max_cells)
            if (width, height) != image.size:
                image = image.resize((width, height), resample=resample)
            pixels.append(np.asarray(image))

        shapes = [(pixels_HWC.shape[0] // p, pixels_HWC.shape[1] // p) for pixels_HWC in pixels]
        spatial_shapes_N2 = np.array(shapes, dtype=np.int64).reshape(-1, 2)
        lengths_N = spatial_shapes_N2.prod(axis=1)
        N, D = len(pixels), 3 * p * p
        L = max_patches if padding == "max_length" else int(lengths_N.max(initial=0))
        pixel_values_NLD = np.zeros((N, L, D), dtype=np.float32)
        for i, pixels_HWC in enumerate(pixels):
            patchify(pixels_HWC, p, scale_D, offset_D, pixel_values_NLD[i])
        pixel_attention_mask_NL = (np.arange(L) < lengths_N[:, None]).astype(np.int32)
        data = {
            "pixel_values": pixel_values_NLD,
            "pixel_attention_mask": pixel_attention_mask_NL,
            "spatial_shapes": spatial_shapes_N2,
            "grid_thw": _grid_thw(spatial_shapes_N2, L),
        }
        if return_tensors == "pt":
            data = {name: torch.from_numpy(array) for name, array in data.items()}
        elif return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data=data)


def _cell_budget(patch_size: int, merge_size: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """The patch budget in (patch_size * merge_size)² cells, checked to be one `smart_resize` can always meet."""
    if patch_size < 1 or merge_size < 1:
        raise ValueError(f"patch_size and merge_size must be at least 1, got {patch_size} and {merge_size}")
    per_cell = merge_size * merge_size
    min_cells, max_cells = max(1, -(-min_patches // per_cell)), max_patches // per_cell
    if max_cells < 4 * min_cells:
        raise ValueError(
            f"max_patches={max_patches} is too small for min_patches={min_patches} with merge_size={merge_size}: "
            f"it must hold at least 4 × max(min_patches, merge_size²) patches (rounded up to whole "
            f"{merge_size}×{merge_size} blocks)"
        )
    return min_cells, max_cells


def _flatten_images(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def _grid_thw(spatial_shapes_N2: np.ndarray, L: int) -> np.ndarray:
    """(0, row, column) of each patch in raster order, -1 on padding."""
    grid_NL3 = np.full((len(spatial_shapes_N2), L, 3), -1, dtype=np.int64)
    for i, (rows, cols) in enumerate(spatial_shapes_N2.tolist()):
        index = np.arange(rows * cols)
        grid_NL3[i, : rows * cols] = np.stack([np.zeros_like(index), index // cols, index % cols], axis=1)
    return grid_NL3


Llama3Siglip2ImageProcessor.register_for_auto_class("AutoImageProcessor")
