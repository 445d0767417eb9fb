"""Safe image decoding: bad inputs raise `InvalidImageError` saying what is wrong; odd ones become correct RGB."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data

from processing import InvalidImageError, Llama3Siglip2ImageProcessor, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def decompression_bomb_png(side: int = 40_000) -> bytes:
    """A 200-byte PNG whose header declares side × side grey pixels (1.6 GB once decoded)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_saying_truncated(astronaut, fmt):
    encoded = encode(astronaut, fmt)
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(encoded[: len(encoded) // 2])


def test_truncated_image_does_not_turn_on_pillows_global_truncated_loading(astronaut):
    with pytest.raises(InvalidImageError):
        load_image(encode(astronaut, "JPEG")[:5000])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_bytes_raise_saying_empty():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")


def test_empty_file_raises_saying_empty(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(path)


def test_random_bytes_raise_saying_not_an_image_format():
    with pytest.raises(InvalidImageError, match="not in a recognised image format"):
        load_image(np.random.default_rng(0).bytes(4096))


def test_html_page_raises_saying_not_an_image_format_and_showing_its_start():
    page = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>"
    with pytest.raises(InvalidImageError, match=r"not in a recognised image format") as error:
        load_image(page)
    assert "<!DOCTYPE html>" in str(error.value)


def test_decompression_bomb_raises_before_decoding():
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        load_image(decompression_bomb_png())
    assert time.perf_counter() - start < 1.0


def test_pixel_limit_is_enforced_even_where_pillows_own_limit_is_off(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InvalidImageError, match="declares 40000x40000 = 1,600,000,000 pixels, over the limit"):
        load_image(decompression_bomb_png())


def test_pixel_limit_is_the_callers_to_set():
    with pytest.raises(InvalidImageError, match="over the limit of 100"):
        load_image(encode(Image.new("RGB", (20, 20)), "PNG"), max_pixels=100)


def test_pillows_decompression_bomb_warning_is_raised_as_an_error(monkeypatch):
    # Between Pillow's threshold and twice it, Pillow only warns; the warning must become our error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    encoded = encode(Image.new("RGB", (15, 10)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller's filters must not decide it
        with pytest.raises(InvalidImageError, match="decompression bomb"):
            load_image(encoded)


def test_loading_leaves_the_warning_filters_as_they_were(astronaut):
    before = list(warnings.filters)
    load_image(encode(astronaut, "PNG"))
    assert warnings.filters == before


def test_too_elongated_image_raises_saying_aspect_ratio():
    processor = Llama3Siglip2ImageProcessor()
    with pytest.raises(InvalidImageError, match="aspect ratio of 500.0, over the limit of 200"):
        processor(Image.new("RGB", (20, 10_000)))


def test_url_is_not_fetched_without_a_fetcher():
    with pytest.raises(InvalidImageError, match="is a URL"):
        load_image("https://example.com/cat.jpg")


def test_url_is_fetched_by_the_callers_fetcher(astronaut):
    asked = []

    def fetcher(url: str) -> bytes:
        asked.append(url)
        return encode(astronaut, "PNG")

    image = load_image("https://example.com/cat.png", fetcher=fetcher)
    assert asked == ["https://example.com/cat.png"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(astronaut))


def test_a_failing_fetcher_raises_the_documented_error():
    def fetcher(url: str) -> bytes:
        raise ConnectionError("no route to host")

    with pytest.raises(InvalidImageError, match="no route to host"):
        load_image("https://example.com/cat.png", fetcher=fetcher)


def test_missing_path_raises_saying_not_a_file(tmp_path):
    with pytest.raises(InvalidImageError, match="is not a file"):
        load_image(tmp_path / "missing.png")


def test_an_unsupported_input_type_raises_naming_the_type():
    with pytest.raises(InvalidImageError, match="dict"):
        load_image({"image": 1})


def test_one_pixel_image_is_scaled_up_to_one_patch_of_its_colour():
    out = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=16)(Image.new("RGB", (1, 1), (255, 0, 51)),
                                                                        return_tensors="pt")
    assert out["spatial_shapes"].tolist() == [[1, 1]]
    first_patch = out["pixel_values"][0, 0].reshape(256, 3)
    torch.testing.assert_close(first_patch, torch.tensor([[1.0, -1.0, -0.6]]).expand(256, 3), rtol=0, atol=1e-6)


def stored_as(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` under an EXIF orientation, from the EXIF definition of each value
    (where the stored 0th row and 0th column lie in the upright scene)."""
    return {
        2: lambda a: a[:, ::-1],  # 0th row top, 0th column right
        3: lambda a: a[::-1, ::-1],  # bottom, right
        4: lambda a: a[::-1, :],  # bottom, left
        5: lambda a: a.transpose(1, 0, 2),  # left, top
        6: lambda a: np.rot90(a, 1),  # right, top
        7: lambda a: np.rot90(a, 1)[:, ::-1],  # right, bottom
        8: lambda a: np.rot90(a, -1),  # left, bottom
    }[orientation](upright)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_undone(orientation):
    upright = random_rgb(24, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    encoded = encode(Image.fromarray(np.ascontiguousarray(stored_as(upright, orientation))), "PNG", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(encoded)), upright)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    "exif",
    [b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x00\x00\x00\x00\x00"],
    ids=["bad-offset", "cut-short"],
)
def test_corrupt_exif_is_ignored_quietly(fmt, exif):
    original = Image.fromarray(random_rgb(16, 24))
    encoded = encode(original, fmt, exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(encoded)
    assert image.mode == "RGB" and image.size == original.size


def rgb_of(image) -> np.ndarray:
    return np.asarray(load_image(image)).astype(int)


def test_rgba_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_of(Image.fromarray(rgba)), [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]],
                               atol=1)


def test_la_is_composited_on_white():
    la = Image.fromarray(np.array([[[0, 255], [0, 0]]], dtype=np.uint8), mode="LA")
    np.testing.assert_array_equal(rgb_of(la), [[[0, 0, 0], [255, 255, 255]]])


def test_palette_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.putdata([0, 1])
    palette_image.info["transparency"] = 1
    decoded = rgb_of(encode(palette_image, "PNG"))  # through PNG, as such images come from files
    np.testing.assert_array_equal(decoded, [[[255, 0, 0], [255, 255, 255]]])


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])  # white, cyan, black
    np.testing.assert_array_equal(rgb_of(cmyk), [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])


def test_16_bit_image_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # Pillow infers I;16 from the dtype
    assert image.mode.startswith("I;16")
    expected = np.round(values / 257).astype(int)  # 0, 4, 128, 255; clipping would give 0, 255, 255, 255
    np.testing.assert_array_equal(rgb_of(image), np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_array_equal(rgb_of(encode(image, "PNG")), np.repeat(expected[..., None], 3, axis=2))


def test_32_bit_integer_image_is_scaled_like_16_bit():
    image = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(rgb_of(image)[..., 0], [[0, 4, 255]])


def test_one_bit_image_is_black_and_white():
    image = Image.fromarray(np.array([[True, False]]))
    assert image.mode == "1"
    np.testing.assert_array_equal(rgb_of(image), [[[255, 255, 255], [0, 0, 0]]])


def test_grayscale_is_repeated_over_three_channels():
    np.testing.assert_array_equal(rgb_of(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))),
                                  [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]])


def test_float_image_uses_pillows_0_to_255_scale():
    image = Image.fromarray(np.array([[0.0, 76.6, 255.0, 300.0]], dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(rgb_of(image)[..., 1], [[0, 77, 255, 255]])


def test_float_array_uses_the_0_to_1_scale():
    np.testing.assert_array_equal(rgb_of(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))[..., 2], [[0, 128, 255]])


def test_torch_tensor_is_read_channels_first():
    chw = torch.zeros(3, 2, 5, dtype=torch.uint8)
    chw[0] = 255
    assert load_image(chw).size == (5, 2)
    np.testing.assert_array_equal(rgb_of(chw)[0, 0], [255, 0, 0])


def test_odd_modes_give_correct_patches_through_the_image_processor():
    rgba = np.zeros((16, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (0, 0, 255, 255)  # opaque blue left patch, transparent right patch
    out = Llama3Siglip2ImageProcessor(patch_size=16, max_patches=4)(Image.fromarray(rgba), return_tensors="pt")
    patches = out["pixel_values"][0, :2].reshape(2, 256, 3)
    torch.testing.assert_close(patches[0], torch.tensor([[-1.0, -1.0, 1.0]]).expand(256, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(patches[1], torch.ones(256, 3), rtol=0, atol=1e-6)


# Colour keys (PNG tRNS): transparency without an alpha channel


def with_key_colour(pixels: np.ndarray, where: tuple[slice, slice], key) -> np.ndarray:
    keyed = pixels.copy()
    keyed[where] = key
    return keyed


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_keyed_png_is_composited_on_white(mode):
    photo = data.astronaut() if mode == "RGB" else data.camera()
    key = (1, 2, 3) if mode == "RGB" else 7
    keyed = with_key_colour(photo, (slice(100, 200), slice(50, 300)), key)
    decoded = rgb_of(encode(Image.fromarray(keyed), "PNG", transparency=key))
    is_key = np.all(keyed.reshape(*keyed.shape[:2], -1) == key, axis=2)
    assert is_key[100:200, 50:300].all()
    np.testing.assert_array_equal(decoded[is_key], 255)
    expected = keyed if mode == "RGB" else np.repeat(keyed[..., None], 3, axis=2)
    np.testing.assert_array_equal(decoded[~is_key], expected[~is_key])


def test_colour_keyed_16_bit_png_is_scaled_and_composited_on_white():
    photo = data.camera().astype(np.uint16) * 257  # the full 16-bit range
    keyed = with_key_colour(photo, (slice(0, 64), slice(0, 64)), 5)
    decoded = rgb_of(encode(Image.fromarray(keyed), "PNG", transparency=5))
    np.testing.assert_array_equal(decoded[:64, :64], 255)
    np.testing.assert_array_equal(decoded[64:, :, 0], data.camera()[64:])


# The byte limit: encoded inputs are refused from their size, before they are read


def test_a_huge_file_is_refused_from_its_size_without_reading_it(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as file:
        file.truncate(3 * 1024**3)  # a sparse 3 GB file: reading it whole would take 3 GB of memory
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match=r"huge.jpg.*3,221,225,472 bytes, over the limit of 268,435,456 bytes"):
        load_image(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("kind", ["path", "bytes", "file object"])
def test_byte_limit_applies_to_every_encoded_input_and_names_the_setting(astronaut, tmp_path, kind):
    encoded = encode(astronaut, "PNG")
    (tmp_path / "astronaut.png").write_bytes(encoded)
    image = {"path": tmp_path / "astronaut.png", "bytes": encoded, "file object": io.BytesIO(encoded)}[kind]
    with pytest.raises(InvalidImageError, match=rf"{len(encoded):,} bytes, over the limit of 1,000 bytes.*max_bytes"):
        load_image(image, max_bytes=1000)


def test_a_file_object_within_the_limit_is_read_from_its_current_position(astronaut):
    file = io.BytesIO(b"header" + encode(astronaut, "PNG"))
    file.seek(6)
    np.testing.assert_array_equal(np.asarray(load_image(file)), np.asarray(astronaut))


class EndlessStream(io.RawIOBase):
    """A stream that cannot seek and never ends, like a pipe from a misbehaving process."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[:] = b"\xff" * len(buffer)
        return len(buffer)


def test_an_endless_stream_is_refused_after_reading_just_past_the_limit():
    with pytest.raises(InvalidImageError, match="1,001 bytes, over the limit of 1,000 bytes"):
        load_image(io.BufferedReader(EndlessStream()), max_bytes=1000)


def test_a_text_mode_file_raises_saying_open_it_in_binary_mode(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with open(tmp_path / "notes.txt") as file, pytest.raises(InvalidImageError, match="binary mode"):
        load_image(file)


def test_the_byte_limit_applies_to_what_a_fetcher_returns(astronaut):
    with pytest.raises(InvalidImageError, match="over the limit of 1,000 bytes"):
        load_image("https://example.com/a.png", fetcher=lambda url: encode(astronaut, "PNG"), max_bytes=1000)
