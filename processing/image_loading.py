"""Safe image decoding: every image that enters the package goes through `load_image`.

Training data is untrusted: files are truncated, mislabelled, decompression bombs, 16-bit, palette-with-alpha or
rotated by an EXIF tag, or a 3 GB file that happens to be named .jpg. `load_image` turns any of them into a 3-channel
8-bit RGB `PIL.Image`, or raises `InvalidImageError` with a message that says what was wrong, so that the data
pipeline can skip and count. Encoded inputs (paths, bytes, file objects) are refused over `max_bytes` before they are
read, and decoded ones over `max_pixels` from their header, so that no input can take a worker's memory.

This file travels to the Hub with the processor: it imports only numpy, torch and PIL.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

# Pillow's own warning threshold (1024 * 1024 * 1024 // 4 // 3 pixels), which we enforce as an error.
MAX_IMAGE_PIXELS = 89_478_485
# An uncompressed 8-bit RGB file at the pixel limit (3 bytes per pixel): no real photo within the pixel limit is
# larger, and reading this much at once is still harmless to a loader worker.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Transparent pixels have no colour of their own; white is what a viewer shows and what Qwen2-VL and LLaVA use.
BACKGROUND_RGB = (255, 255, 255)

# Formats photos and datasets come in. Others (EPS runs Ghostscript, PSD, FITS, ...) are never tried on
# untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "AVIF", "QOI")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that undoes it (orientation 1 is upright).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_KEYED_MODES = {"P", "1", "L", "RGB"}  # modes whose colour key Pillow converts to alpha


class InvalidImageError(ValueError):
    """An input that is not a usable image. The message names the input and what was wrong with it."""


def load_image(
    image: Any,
    *,
    fetcher: Callable[[str], Any] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """Decode `image` to an RGB `PIL.Image` with its EXIF orientation applied, or raise `InvalidImageError`.

    Accepts a `PIL.Image`, raw encoded bytes, a local path (str or `os.PathLike`), a binary file object (anything
    with `read`, read from its current position), a numpy array or a torch tensor.
    Arrays are (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; numpy arrays are taken channels-last and torch
    tensors channels-first where the shape allows both. Array values: uint8 as is, uint16 over 0..65535, other
    integers over 0..255, floats over [0, 1], bool black/white. PIL modes follow Pillow's scales: I;16 and I over
    0..65535 (scaled, not clipped at 255 as `Image.convert` does), F over 0..255. Alpha (RGBA, LA, P with
    transparency, and L, RGB or 16-bit grey with a colour key (PNG's tRNS)) is composited on `BACKGROUND_RGB`.

    A URL is never fetched unless `fetcher` is given: `fetcher(url)` returns the image (bytes, PIL, ...), which is
    then loaded like any other input. Images over `max_pixels` are refused from their header, before decoding;
    encoded inputs over `max_bytes` before they are read (a path's size from the file system, a file object's from
    seeking, or by reading at most `max_bytes` + 1 bytes where it cannot seek).
    """
    if isinstance(image, (str, os.PathLike)) and _URL.match(str(image)):
        if fetcher is None:
            raise InvalidImageError(f"{_describe(image)} is a URL; URLs are only fetched when a `fetcher` is passed")
        try:
            fetched = fetcher(str(image))
        except Exception as error:  # whatever the fetcher raises, the image is unusable
            raise InvalidImageError(f"fetching {_describe(image)} failed: {type(error).__name__}: {error}") from error
        return load_image(fetched, max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(image, Image.Image):
        return _decode(lambda: image, _describe(image), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        size = memoryview(image).nbytes
        _check_size(size, "image bytes", max_bytes)
        data = bytes(image)
        return _decode(lambda: _open(data), f"image bytes ({size} bytes, starting {data[:16]!r})", max_pixels)
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise InvalidImageError(f"{_describe(image)} is not a file (and not a URL)")
        try:
            with open(image, "rb") as file:
                data = _read_at_most(file, _describe(image), max_bytes)
        except OSError as error:
            raise InvalidImageError(f"{_describe(image)} could not be read: {error}") from error
        return _decode(lambda: _open(data), _describe(image), max_pixels)
    if callable(getattr(image, "read", None)):
        what = f"file object {_describe_file(image)}"
        try:
            data = _read_at_most(image, what, max_bytes)
        except InvalidImageError:
            raise
        except (OSError, ValueError) as error:  # closed, not readable, ...
            raise InvalidImageError(f"{what} could not be read: {type(error).__name__}: {error}") from error
        if not isinstance(data, bytes):
            raise InvalidImageError(f"{what} gives {type(data).__name__}, not bytes; open it in binary mode ('rb')")
        return _decode(lambda: _open(data), what, max_pixels)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        array = (tensor.float() if tensor.is_floating_point() else tensor).numpy()  # numpy has no bfloat16
        return _array_to_rgb(array, "torch tensor", channels_first=True, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "numpy array", channels_first=False, max_pixels=max_pixels)
    raise InvalidImageError(f"unsupported image input of type {type(image).__name__}")


def _describe(image: Any) -> str:
    if isinstance(image, Image.Image):
        return f"PIL image ({image.mode}, {image.width}x{image.height})"
    text = str(image)
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _describe_file(file: Any) -> str:
    name = getattr(file, "name", None)
    return repr(name) if isinstance(name, (str, os.PathLike)) else f"of type {type(file).__name__}"


def _check_size(size: int, what: str, max_bytes: int) -> None:
    if size == 0:
        raise InvalidImageError(f"{what}: empty (0 bytes)")
    if size > max_bytes:
        raise InvalidImageError(
            f"{what}: {size:,} bytes, over the limit of {max_bytes:,} bytes for one image (`max_bytes`; the data "
            "config's `max_image_bytes`)"
        )


def _read_at_most(file: Any, what: str, max_bytes: int) -> bytes:
    """Read the rest of `file`, refusing it from its size where it can seek, or once it passes `max_bytes`."""
    if getattr(file, "seekable", lambda: False)():
        start = file.tell()
        size = file.seek(0, os.SEEK_END) - start
        file.seek(start)
        _check_size(size, what, max_bytes)
    # Read one byte past the limit even when the size was known: a file can grow, and /proc-like files report 0.
    data = file.read(max_bytes + 1)
    if isinstance(data, bytes):
        _check_size(len(data), what, max_bytes)
    return data


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def _decode(open_image: Callable[[], Image.Image], what: str, max_pixels: int) -> Image.Image:
    """Open, check the size, decode and convert, turning every failure into an `InvalidImageError`."""
    with warnings.catch_warnings():
        # Pillow only warns between its two bomb thresholds; a bomb in a dataset must fail, not slow a worker down.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow parses a JPEG's EXIF on open and warns when it is corrupt; we ignore bad EXIF (see below).
        warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
        try:
            image = open_image()
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise InvalidImageError(
                    f"{what} declares {image.width}x{image.height} = {pixels:,} pixels, over the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            if image.width == 0 or image.height == 0:
                raise InvalidImageError(f"{what} is empty ({image.width}x{image.height})")
            image.load()
            return _to_rgb(_apply_exif_orientation(image))
        except InvalidImageError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise InvalidImageError(f"{what} is a possible decompression bomb: {error}") from error
        except Image.UnidentifiedImageError as error:
            raise InvalidImageError(f"{what} is not in a recognised image format") from error
        except Exception as error:  # Pillow's decoders raise many types on corrupt data
            raise InvalidImageError(f"{what} could not be decoded: {type(error).__name__}: {error}") from error


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # A corrupt EXIF block says nothing reliable about orientation, but the pixels are still good: ignore it quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001
            return image
    # Transposing the pixels ourselves, unlike ImageOps.exif_transpose, never rewrites (possibly corrupt) metadata.
    undo = _UNDO_ORIENTATION.get(orientation)
    return image if undo is None else image.transpose(undo)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    # A colour key (PNG's tRNS, GIF's transparent index) marks transparent pixels without an alpha channel.
    keyed = "transparency" in image.info
    if mode in _ALPHA_MODES or keyed and mode in _KEYED_MODES:
        rgba = image.convert("RGBA")  # Pillow turns the colour key of these modes into alpha
        return _composite(rgba, rgba.getchannel("A"))
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own conversion clips 16-bit values at 255, which turns most of a 16-bit photo white.
        gray = _gray_to_rgb(_scale_to_uint8(np.asarray(image), full_scale=65535))
        if not keyed:
            return gray
        opaque = np.asarray(image) != image.info["transparency"]
        return _composite(gray, Image.fromarray(opaque.astype(np.uint8) * 255))
    if mode == "F":
        return _gray_to_rgb(_scale_to_uint8(np.asarray(image), full_scale=255))
    # 1, L, P, CMYK, YCbCr, RGBX, ...: Pillow's own conversions are right for these.
    return image.convert("RGB")


def _composite(image: Image.Image, alpha: Image.Image) -> Image.Image:
    composite = Image.new("RGB", image.size, BACKGROUND_RGB)
    composite.paste(image, mask=alpha)
    return composite


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _array_to_rgb(array: np.ndarray, what: str, channels_first: bool, max_pixels: int) -> Image.Image:
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise InvalidImageError(f"{what} of shape {array.shape} has no channel axis of size 1, 3 or 4")
    elif array.ndim == 2:
        array = array[:, :, None]
    else:
        raise InvalidImageError(f"{what} of shape {array.shape} is not (H, W), (H, W, C) or (C, H, W)")
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise InvalidImageError(f"{what} of shape {array.shape} is empty")
    if height * width > max_pixels:
        raise InvalidImageError(f"{what} has {height}x{width} pixels, over the limit of {max_pixels:,}")
    array = np.ascontiguousarray(_array_to_uint8(array, what))
    if channels == 4:
        return _to_rgb(Image.fromarray(array))  # (H, W, 4) uint8 is RGBA
    if channels == 1:
        return _gray_to_rgb(array[:, :, 0])
    return Image.fromarray(array)


def _array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "f":
        return _scale_to_uint8(array, full_scale=1.0)
    if kind == "u" and array.dtype.itemsize == 2:
        return _scale_to_uint8(array, full_scale=65535)
    if kind in "iu":
        return _scale_to_uint8(array, full_scale=255)
    raise InvalidImageError(f"{what} has unsupported dtype {array.dtype}")


def _scale_to_uint8(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Map [0, full_scale] linearly onto 0..255, rounding; values outside the range are clipped to it."""
    finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=full_scale, neginf=0.0)
    scaled = np.clip(finite, 0.0, full_scale) * (255.0 / full_scale)
    return (scaled + 0.5).astype(np.uint8)
