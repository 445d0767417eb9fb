"""The image processor: `smart_resize` properties, SigLIP2 parity, patch layout, padding, inputs, save and load."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Siglip2ImageProcessorPil
from transformers.models.auto.image_processing_auto import (
    AutoImageProcessor,  # a placeholder at top level in 5.17 without torchvision
)

from processing import InvalidImageError, Llama3Siglip2ImageProcessor, smart_resize

MAX_SIDE = 20_000


@st.composite
def budgets(draw):
    """(factor, min_patches, max_patches) with the 4× slack `smart_resize` requires."""
    factor = draw(st.sampled_from([1, 14, 16, 28, 32]))
    min_patches = draw(st.integers(1, 256))
    max_patches = draw(st.integers(4 * min_patches, 16_384))
    return factor, min_patches, max_patches


@st.composite
def sizes_within_aspect_limit(draw):
    height = draw(st.integers(1, MAX_SIDE))
    width = draw(st.integers(max(1, math.ceil(height / 200)), min(MAX_SIDE, 200 * height)))
    return height, width


def scale_fits_both_sides(height: int, width: int, new_height: int, new_width: int, factor: int) -> bool:
    """Is there one scale s with each new side within one factor of s × the old side? (exact aspect, ±1 step)"""
    lower = max((new_height - factor) / height, (new_width - factor) / width)
    upper = min((new_height + factor) / height, (new_width + factor) / width)
    return lower <= upper * (1 + 1e-12)


@settings(max_examples=300, deadline=None)
@given(sizes_within_aspect_limit(), budgets())
def test_smart_resize_sides_are_multiples_of_factor(size, budget):
    factor, min_patches, max_patches = budget
    height, width = smart_resize(*size, factor, min_patches, max_patches)
    assert height % factor == 0 and width % factor == 0
    assert height >= factor and width >= factor


@settings(max_examples=300, deadline=None)
@given(sizes_within_aspect_limit(), budgets())
def test_smart_resize_patch_count_is_within_budget(size, budget):
    factor, min_patches, max_patches = budget
    height, width = smart_resize(*size, factor, min_patches, max_patches)
    assert min_patches <= (height // factor) * (width // factor) <= max_patches


@settings(max_examples=300, deadline=None)
@given(sizes_within_aspect_limit(), budgets())
def test_smart_resize_aspect_error_is_at_most_one_factor_step(size, budget):
    factor, min_patches, max_patches = budget
    height, width = smart_resize(*size, factor, min_patches, max_patches)
    assert scale_fits_both_sides(*size, height, width, factor)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, MAX_SIDE), st.integers(1, MAX_SIDE), budgets())
@example(200, 1, (16, 1, 256))
@example(1, 201, (16, 1, 256))
@example(20_000, 100, (16, 1, 256))
@example(20_000, 99, (16, 1, 256))
def test_smart_resize_raises_exactly_when_aspect_ratio_exceeds_200(height, width, budget):
    too_elongated = max(height, width) / min(height, width) > 200
    try:
        smart_resize(height, width, *budget)
        raised = False
    except ValueError as error:
        assert "aspect ratio" in str(error)
        raised = True
    assert raised == too_elongated


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), budgets())
def test_smart_resize_keeps_a_size_that_is_already_valid(rows, cols, budget):
    factor, min_patches, max_patches = budget
    if not (min_patches <= rows * cols <= max_patches and max(rows, cols) <= 200 * min(rows, cols)):
        return
    assert smart_resize(rows * factor, cols * factor, factor, min_patches, max_patches) == (rows * factor, cols * factor)


def test_smart_resize_rejects_a_budget_without_room_to_keep_the_aspect_ratio():
    with pytest.raises(ValueError, match="min_patches"):
        smart_resize(100, 300, 16, min_patches=256, max_patches=256)


def test_aspect_ratio_error_is_the_documented_image_error():
    with pytest.raises(InvalidImageError, match="aspect ratio of 500.0"):
        smart_resize(10_000, 20, 16, 1, 256)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("height, width", [(256, 256), (128, 512), (512, 128), (64, 1024), (192, 336)])
def test_pixel_values_equal_siglip2_for_an_image_of_valid_size(height, width):
    image = random_image(height, width)
    ours = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=256)(image, return_tensors="pt")
    reference = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)(image, return_tensors="pt")
    assert torch.equal(ours["spatial_shapes"], reference["spatial_shapes"].long())
    assert torch.equal(ours["pixel_attention_mask"], reference["pixel_attention_mask"].int())
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-6)


def unpatchify(pixel_values_LD: torch.Tensor, rows: int, cols: int, patch_size: int) -> np.ndarray:
    """Invert the (ph, pw, c) raster layout and the 0.5/0.5 normalisation, back to uint8 (H, W, 3)."""
    p = patch_size
    patches = pixel_values_LD[: rows * cols].reshape(rows, cols, p, p, 3).permute(0, 2, 1, 3, 4)
    return ((patches.reshape(rows * p, cols * p, 3) + 1) * 127.5).round().to(torch.uint8).numpy()


def test_patches_are_raster_order_with_pixels_in_ph_pw_c_layout():
    image = random_image(48, 80)  # 3 × 5 patches of 16: no resize
    out = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=64)(image, return_tensors="pt")
    np.testing.assert_array_equal(unpatchify(out["pixel_values"][0], 3, 5, 16), np.asarray(image))


def test_grid_thw_gives_row_and_column_of_each_patch_and_minus_one_on_padding():
    out = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=16)(random_image(32, 48), return_tensors="pt")
    grid = out["grid_thw"][0]
    expected = [(0, row, col) for row in range(2) for col in range(3)]
    assert grid[:6].tolist() == [list(t) for t in expected]
    assert (grid[6:] == -1).all()
    assert grid.shape == (16, 3)


def test_image_mean_and_std_are_applied_per_channel():
    image = Image.new("RGB", (16, 16), (255, 0, 51))
    processor = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=4, image_mean=[0.5, 0.25, 0.2],
                                            image_std=[0.5, 0.25, 0.1])
    first_pixel = processor(image, return_tensors="pt")["pixel_values"][0, 0, :3]
    torch.testing.assert_close(first_pixel, torch.tensor([1.0, -1.0, 0.0]), rtol=0, atol=1e-6)


def test_merge_size_makes_the_patch_grid_a_multiple_of_the_merge():
    processor = Llama3Siglip2ImageProcessor(patch_size=16, merge_size=2, max_patches=256)
    out = processor([random_image(300, 451), random_image(17, 900)], return_tensors="pt")
    assert (out["spatial_shapes"] % 2 == 0).all()
    assert processor.num_image_tokens(out["spatial_shapes"]) == [
        (rows // 2) * (cols // 2) for rows, cols in out["spatial_shapes"].tolist()
    ]


def test_padding_longest_pads_to_the_longest_image_and_max_length_to_max_patches():
    processor = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=64)
    images = [random_image(32, 32), random_image(64, 48)]  # 4 and 12 patches
    assert processor(images, padding="longest")["pixel_values"].shape == (2, 12, 768)
    longest = processor(images, padding="longest")["pixel_attention_mask"]
    assert longest.sum(axis=1).tolist() == [4, 12]
    assert processor(images)["pixel_values"].shape == (2, 64, 768)


def test_output_dtypes_are_the_contracts():
    out = Llama3Siglip2ImageProcessor(max_patches=16)(random_image(40, 40), return_tensors="pt")
    dtypes = {name: out[name].dtype for name in ("pixel_values", "pixel_attention_mask", "spatial_shapes", "grid_thw")}
    assert dtypes == {"pixel_values": torch.float32, "pixel_attention_mask": torch.int32,
                      "spatial_shapes": torch.int64, "grid_thw": torch.int64}


def test_every_input_type_gives_the_same_pixel_values(tmp_path):
    array = np.asarray(random_image(40, 56))
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(encoded.getvalue())
    inputs = [Image.fromarray(array), array, torch.from_numpy(array.copy()).permute(2, 0, 1), encoded.getvalue(), str(path),
              path]
    processor = Llama3Siglip2ImageProcessor(patch_size=8, max_patches=64)
    outputs = [processor(image, return_tensors="pt")["pixel_values"] for image in inputs]
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])


def test_a_budget_without_slack_is_refused_at_construction():
    with pytest.raises(ValueError, match="max_patches=8 is too small"):
        Llama3Siglip2ImageProcessor(patch_size=16, merge_size=2, min_patches=4, max_patches=8)


def test_save_and_auto_load_give_the_same_processor_and_outputs(tmp_path):
    processor = Llama3Siglip2ImageProcessor(patch_size=14, merge_size=2, min_patches=4, max_patches=196,
                                            image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4], resample=3)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "Llama3Siglip2ImageProcessor"
    assert loaded.to_dict() == processor.to_dict()
    image = random_image(123, 321)
    expected, actual = processor(image, return_tensors="pt"), loaded(image, return_tensors="pt")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
