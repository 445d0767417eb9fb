"""The embedded scenes set draws what its captions say, within the stated ranges, deterministically by seed."""

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processing.scenes import PALETTE, ScenesSource, scene_caption, scenes_eval_examples
from processing.tokenizer import IMAGE_TOKEN

CAPTION = re.compile(r"a (\w+) box and a (\w+) box")
examples = st.tuples(st.integers(0, 2**31), st.integers(0, 9999))  # (seed, index)


def single_scene(seed: int, index: int) -> tuple[np.ndarray, str]:
    example = ScenesSource("train", 10_000, seed, interleaved_share=0.0)[index]
    return np.asarray(example["images"][0]), example["text"].removeprefix(IMAGE_TOKEN)


def box_of(pixels_HWC: np.ndarray, colour: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the bounding box of the pixels of one palette colour."""
    ys, xs = np.nonzero((pixels_HWC == PALETTE[colour]).all(axis=2))
    return ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


@settings(max_examples=60, deadline=None)
@given(examples)
def test_image_sizes_lie_in_the_stated_ranges(example):
    pixels, _ = single_scene(*example)
    height, width, channels = pixels.shape
    assert 32 <= height <= 64 and 64 <= width <= 112 and channels == 3


@settings(max_examples=60, deadline=None)
@given(examples)
def test_background_channels_lie_between_90_and_170(example):
    pixels, _ = single_scene(*example)
    # Each box covers at most 64 % of its half, so the background is the most common colour.
    colours = Counter(map(tuple, pixels.reshape(-1, 3).tolist()))
    background = colours.most_common(1)[0][0]
    assert all(90 <= channel <= 170 for channel in background)


@settings(max_examples=60, deadline=None)
@given(examples)
def test_caption_names_the_left_box_then_the_right_box_in_different_colours(example):
    pixels, caption = single_scene(*example)
    left, right = CAPTION.fullmatch(caption).groups()
    half = pixels.shape[1] // 2
    _, left_x, _, left_w = box_of(pixels, left)
    _, right_x, _, _ = box_of(pixels, right)
    assert left != right and left_x + left_w <= half <= right_x


@settings(max_examples=60, deadline=None)
@given(examples)
def test_boxes_are_filled_squares_of_44_to_80_percent_of_the_smaller_of_half_width_and_height(example):
    pixels, caption = single_scene(*example)
    height, width, _ = pixels.shape
    for colour, half_width in zip(CAPTION.fullmatch(caption).groups(), (width // 2, width - width // 2)):
        top, left, box_height, box_width = box_of(pixels, colour)
        assert box_height == box_width
        assert (pixels[top : top + box_height, left : left + box_width] == PALETTE[colour]).all()
        limit = min(half_width, height)
        assert round(0.44 * limit) <= box_width <= round(0.80 * limit)


def test_palette_colours_never_occur_as_background():
    # The box finder above relies on it: every palette colour has a channel outside 90-170.
    assert all(any(not 90 <= channel <= 170 for channel in rgb) for rgb in PALETTE.values())


def test_same_seed_draws_identical_examples():
    first, second = ScenesSource(seed=3)[17], ScenesSource(seed=3)[17]
    assert first["text"] == second["text"]
    assert all(np.array_equal(a, b) for a, b in zip(first["images"], second["images"]))


def test_different_seeds_draw_different_examples():
    texts = {ScenesSource(seed=seed)[0]["text"] for seed in range(20)}
    assert len(texts) > 10


def test_eval_split_shares_no_image_with_train():
    train = {np.asarray(ScenesSource("train", 300)[i]["images"][0]).tobytes() for i in range(300)}
    evaluation = {np.asarray(images[0]).tobytes() for images, _ in scenes_eval_examples(300)}
    assert not train & evaluation


def test_about_a_fifth_of_examples_are_interleaved_pairs():
    source = ScenesSource("train", 2000)
    share = sum(len(source[i]["images"]) == 2 for i in range(2000)) / 2000
    assert 0.17 < share < 0.23


def test_interleaved_example_puts_each_caption_after_its_image():
    source = ScenesSource("train", 100, interleaved_share=1.0)
    example = source[5]
    captions = example["text"].split(IMAGE_TOKEN)[1:]
    assert len(example["images"]) == len(captions) == 2
    for image, caption in zip(example["images"], captions):
        pixels = np.asarray(image)
        left, right = CAPTION.fullmatch(caption).groups()
        assert box_of(pixels, left)[1] < box_of(pixels, right)[1]


def test_text_example_is_the_image_token_followed_by_the_caption():
    example = ScenesSource("train", 10, interleaved_share=0.0, image_token="<img>")[0]
    assert re.fullmatch(r"<img>a \w+ box and a \w+ box", example["text"])


def test_eval_examples_are_one_image_and_its_caption():
    for images, caption in scenes_eval_examples(20, seed=1):
        assert len(images) == 1 and CAPTION.fullmatch(caption)


def test_caption_format_is_exact():
    assert scene_caption("red", "blue") == "a red box and a blue box"


def test_unknown_split_is_refused_at_construction():
    with pytest.raises(ValueError, match="not 'validation'"):
        ScenesSource("validation")
