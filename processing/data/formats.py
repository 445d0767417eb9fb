"""Raw data set examples to packed samples, in the three formats, with every bad sample caught by its reason.

Formats (the data config's `format`, or found from the column names):
    caption      an image and its text (CC12M webdataset `jpg`/`txt`, imagefolder `image` + metadata `text`)
                 -> `<|image|>` + caption
    interleaved  `texts` and `images`, lists of equal length with None holes (OBELICS)
                 -> the texts in order, `<|image|>` where an image is
    chat         `messages` (or LLaVA's `conversations`, with `from`/`value` and `<image>` in the text) and the
                 chat's images (`images`, or LLaVA's single `image`) -> labels on the assistant turns only
    text         `text` that already holds `<|image|>` placeholders and an `images` list (the processor's own
                 input; the embedded scenes set)

An image may come as a PIL image, bytes, a path or a `datasets` Image value `{"bytes", "path"}`. Images are
decoded here, in the loader's workers, with the processor's `load_image`, within a byte and a pixel limit. With
`image_root`, a path in the data is taken relative to it and must stay inside it (no `../`, no absolute path
elsewhere) unless `allow_paths_outside_image_root`; symlinks inside image_root are followed, since that folder is
the user's and the paths are the data's. Without `image_root`, paths are used as they are: relative ones from the
current directory.

A bad example raises `SkippedSample` with one of `SKIP_REASONS`, whatever is wrong with it: a missing, null or
wrongly typed field, a message that is not a dict, an unknown role, an image that cannot be read. The pipeline
counts it, or raises `BadSampleError` in strict mode. Anything else that goes wrong while making a sample (a bug
here or in the processor, or a shape nobody foresaw) is counted too, but under its own reason
`unexpected_<ExceptionType>` and logged once with its traceback, so that it is never mistaken for bad data.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..collator import EMPTY_TEXT, TOO_LONG, TOO_MANY_IMAGES, PackedSample, to_packed_sample
from ..image_loading import MAX_IMAGE_BYTES, InvalidImageError, load_image

INVALID_IMAGE = "invalid_image"  # undecodable, truncated, too large, a bomb, an extreme aspect ratio, a URL, missing
PATH_OUTSIDE_IMAGE_ROOT = "path_outside_image_root"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
MISSING_FIELD = "missing_field"  # a column or key the format needs is absent or null
MALFORMED_EXAMPLE = "malformed_example"  # a field of the wrong type: a number for text, a string for a list, ...
UNKNOWN_ROLE = "unknown_role"
PROCESSOR_ERROR = "processor_error"  # any other ValueError the processor raises for this example
SKIP_REASONS = (INVALID_IMAGE, PATH_OUTSIDE_IMAGE_ROOT, PLACEHOLDER_MISMATCH, TOO_LONG, TOO_MANY_IMAGES, EMPTY_TEXT)
SKIP_REASONS += (MISSING_FIELD, MALFORMED_EXAMPLE, UNKNOWN_ROLE, PROCESSOR_ERROR)
UNEXPECTED_PREFIX = "unexpected_"  # + the exception's type: anything else that failed; see `SampleMaker.__call__`

FORMATS = ("caption", "interleaved", "chat", "text")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("text", "txt", "caption")
LLAVA_IMAGE_PLACEHOLDER = "<image>"
# Roles as written in the data (compared in lower case) -> the chat template's roles.
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
WEBDATASET_COLUMNS = ("__key__", "__url__")
WEBDATASET_HINT = (
    " `datasets` infers a webdataset's columns from the first 5 samples of its first tar and drops any others: if "
    "those samples lack a file type that later ones have (e.g. .txt), name its column (text_column='txt')."
)

logger = logging.getLogger(__name__)


class SkippedSample(Exception):
    """An example that cannot become a sample; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class BadSampleError(ValueError):
    """Raised in strict mode for the first bad example; the message names it and says what was wrong."""


@dataclass
class ColumnMap:
    """Which columns hold what; None finds them from the usual names."""

    format: str = "auto"
    image: str | None = None
    text: str | None = None
    images: str | None = None
    texts: str | None = None
    messages: str | None = None
    columns: Sequence[str] = field(default_factory=tuple)

    def resolved(self) -> ColumnMap:
        """Fill in the format and the column names from `columns`, or say what is missing."""
        names = set(self.columns)

        def pick(given: str | None, candidates: Sequence[str]) -> str | None:
            return given or next((c for c in candidates if c in names), None)

        messages = pick(self.messages, ("messages", "conversations"))
        images, texts = pick(self.images, ("images",)), pick(self.texts, ("texts",))
        image, text = pick(self.image, IMAGE_COLUMNS), pick(self.text, CAPTION_COLUMNS)
        fmt = _detect_format(messages, images, texts, image, text) if self.format == "auto" else self.format
        hint = WEBDATASET_HINT if names.issuperset(WEBDATASET_COLUMNS) else ""
        if fmt not in FORMATS:
            raise ValueError(
                f"cannot tell the sample format from the columns {sorted(names)}; set format to one of {FORMATS} "
                "and name the columns (image_column, text_column, images_column, texts_column, messages_column)"
                + hint
            )
        if fmt == "chat" and images is None:
            images = pick(None, ("image",))
        needed = {
            "caption": (image, text),
            "interleaved": (images, texts),
            "chat": (messages,),
            "text": (text, images),
        }
        if None in needed[fmt]:
            raise ValueError(
                f"format {fmt!r} needs columns that {sorted(names)} lack; name them in the data config" + hint
            )
        return ColumnMap(fmt, image, text, images, texts, messages, self.columns)


def _detect_format(messages, images, texts, image, text) -> str | None:
    if messages:
        return "chat"
    if images and texts:
        return "interleaved"
    if images and text:
        return "text"
    if image and text:
        return "caption"
    return None


def webdataset_features(features: Mapping | None, columns: ColumnMap):
    """Features to open a webdataset with so that it reads the columns `columns` names, or None if none is missing.

    `datasets` infers a webdataset's features from the first 5 samples of its first tar: it drops a file type that
    only later samples have, and refuses the tar when those 5 differ. Given the inferred `features`, this adds the
    image and text columns that `columns` names where they are missing (with no text column named, `txt`: the
    webdataset convention for a caption). Given None (the tar was refused), it builds the features from the named
    image and text columns alone, or returns None unless both are named. Samples without such a file then have None
    there, which `SampleMaker` counts as a skip.
    """
    from datasets import Features, Image, Value

    if features is None and (columns.image is None or columns.text is None):
        return None
    present = dict(features or {})
    wanted = {columns.image: Image(decode=False), columns.text or "txt": Value("string")}
    if columns.text is None and any(name in present for name in CAPTION_COLUMNS):
        del wanted["txt"]
    missing = {name: kind for name, kind in wanted.items() if name is not None and name not in present}
    if features is not None and not missing:
        return None
    keys = {name: Value("string") for name in WEBDATASET_COLUMNS if name not in present}
    return Features({**present, **missing, **keys})


class SampleMaker:
    """`maker(example, name) -> PackedSample`, or `SkippedSample` with its reason.

    `name` says which example it is in error messages: the readers' "example 1834" (its index in the data set) or
    "streamed example 17 (key 'sample017')" (see `sources`). Images are read
    within `max_image_bytes` and the image processor's pixel limit; paths under `image_root` (see the module's
    docstring).
    """

    def __init__(
        self,
        processor,
        columns: ColumnMap,
        seq_len: int,
        max_images: int | None = None,
        image_root: str | None = None,
        append_eos: bool = True,
        *,
        allow_paths_outside_image_root: bool = False,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ):
        self.processor, self.columns, self.seq_len = processor, columns, seq_len
        self.max_images, self.image_root = max_images, image_root
        self.allow_paths_outside_image_root, self.max_image_bytes = allow_paths_outside_image_root, max_image_bytes
        # Without an end token the model never learns to stop; chat templates end turns themselves.
        self.text_end = (processor.tokenizer.eos_token or "") if append_eos else ""

    def __call__(self, example: Mapping, name: str = "example") -> PackedSample:
        try:
            return self._make(example)
        except (SkippedSample, MemoryError):
            raise
        except Exception as error:
            # Not a bad shape this module checks for: a bug, here or in the processor, or a shape nobody foresaw.
            # Skipping keeps one odd example from ending a run; its own reason and a logged traceback keep it from
            # passing for bad data.
            reason = UNEXPECTED_PREFIX + type(error).__name__
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            if reason not in _logged_unexpected:
                _logged_unexpected.add(reason)
                logger.warning("%s: %s while making a sample, counted as %r", name, error, reason, exc_info=error)
            raise SkippedSample(reason, f"{type(error).__name__} at {where}: {error}") from error

    def _make(self, example: Mapping) -> PackedSample:
        if not isinstance(example, Mapping):
            raise SkippedSample(MALFORMED_EXAMPLE, f"the example is {_kind(example)}, not a mapping of columns")
        fmt = self.columns.format
        if fmt == "chat":
            messages, raw_images = self._chat(example)
        else:
            to_text = {"caption": self._caption, "interleaved": self._interleaved, "text": self._text}[fmt]
            text, raw_images = to_text(example)
            self._check_text(text, len(raw_images))
        if self.max_images is not None and len(raw_images) > self.max_images:
            raise SkippedSample(
                TOO_MANY_IMAGES, f"{len(raw_images)} images, over the batch budget of {self.max_images}"
            )
        images = [self._load(image, position) for position, image in enumerate(raw_images)]
        try:
            if fmt == "chat":
                processed = self.processor.build_sft_sample(messages, images=images)
            else:
                processed = self.processor.process_sample(text + self.text_end, images)
        except InvalidImageError as error:
            raise SkippedSample(INVALID_IMAGE, str(error)) from error
        except ValueError as error:
            raise SkippedSample(PROCESSOR_ERROR, str(error)) from error
        sample = to_packed_sample(processed, index=0)
        if sample.length > self.seq_len:
            raise SkippedSample(TOO_LONG, f"{sample.length} tokens, over seq_len {self.seq_len}")
        return sample

    def _column(self, example: Mapping, column: str) -> Any:
        if column not in example:
            raise SkippedSample(MISSING_FIELD, f"the example has no column {column!r} (it has {_keys(example)})")
        return example[column]

    def _check_text(self, text: str, image_count: int) -> None:
        token = self.processor.image_token
        if not text.replace(token, "").strip():
            raise SkippedSample(EMPTY_TEXT, "no text besides image placeholders")
        if text.count(token) != image_count:
            raise SkippedSample(
                PLACEHOLDER_MISMATCH, f"{text.count(token)} {token} placeholders but {image_count} images"
            )

    def _caption(self, example: Mapping) -> tuple[str, list]:
        image = self._column(example, self.columns.image)
        caption = _text(self._column(example, self.columns.text), f"column {self.columns.text!r}")
        if image is None:
            raise SkippedSample(MISSING_FIELD, f"column {self.columns.image!r} is null: the example has no image")
        return self.processor.image_token + caption, [image]

    def _text(self, example: Mapping) -> tuple[str, list]:
        text = _text(self._column(example, self.columns.text), f"column {self.columns.text!r}")
        return text, _images(self._column(example, self.columns.images))

    def _interleaved(self, example: Mapping) -> tuple[str, list]:
        texts = _list(self._column(example, self.columns.texts), f"column {self.columns.texts!r}")
        images = _list(self._column(example, self.columns.images), f"column {self.columns.images!r}")
        if len(texts) != len(images):
            raise SkippedSample(PLACEHOLDER_MISMATCH, f"{len(texts)} texts but {len(images)} image slots")
        pieces, kept_images = [], []
        for position, (text, image) in enumerate(zip(texts, images)):
            if text is not None and image is not None:
                raise SkippedSample(PLACEHOLDER_MISMATCH, f"position {position} holds both a text and an image")
            if image is not None:
                pieces.append(self.processor.image_token)
                kept_images.append(image)
            elif text is not None:
                # Paragraphs that follow each other stay apart; an image token already separates.
                separator = "\n\n" if pieces and pieces[-1] != self.processor.image_token else ""
                pieces.append(separator + _text(text, f"{self.columns.texts!r} position {position}"))
        return "".join(pieces), kept_images

    def _chat(self, example: Mapping) -> tuple[list[dict], list]:
        """Messages whose image parts are all bare, and the chat's images in the order of those parts."""
        # A chat without images may lack the images column altogether (LLaVA's text-only examples do).
        given = _images(example.get(self.columns.images)) if self.columns.images else []
        raw = self._column(example, self.columns.messages)
        if raw is None:
            raise SkippedSample(MISSING_FIELD, f"column {self.columns.messages!r} is null: the example has no chat")
        raw = _list(raw, f"column {self.columns.messages!r}")
        messages = [self._message(message, f"message {i}") for i, message in enumerate(raw)]
        parts = [part for message in messages for part in message["content"] if part["type"] == "image"]
        carried = [part.pop("image", None) for part in parts]
        bare = carried.count(None)
        if bare != len(given):
            raise SkippedSample(PLACEHOLDER_MISMATCH, f"{bare} image parts without an image but {len(given)} images")
        given_in_order = iter(given)
        images = [image if image is not None else next(given_in_order) for image in carried]
        said = [part.get("text", "").strip() for m in messages if m["role"] == "assistant" for part in m["content"]]
        if not any(said):
            raise SkippedSample(EMPTY_TEXT, "no assistant turn with text to learn from")
        return messages, images

    def _message(self, message: Any, where: str) -> dict:
        """A chat message in the processor's form: role and content parts; LLaVA's `from`/`value` converted."""
        if not isinstance(message, Mapping):
            raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is {_kind(message)}, not a dict with a role and content")
        # Columns stored by `datasets` carry every key of every message, None where a message lacks it.
        role_key = "role" if message.get("role") is not None else "from"
        content_key = "content" if message.get("content") is not None else "value"
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            raise SkippedSample(MISSING_FIELD, f"{where} has no role: 'role' and 'from' are missing or null")
        if not isinstance(role, str):
            raise SkippedSample(MALFORMED_EXAMPLE, f"{where}: {role_key!r} is {_kind(role)}, not a role name")
        if role.lower() not in ROLES:
            raise SkippedSample(UNKNOWN_ROLE, f"{where}: role {role!r} is none of {sorted(ROLES)}")
        where = f"{where} ({role_key} {role!r})"
        if content is None:
            raise SkippedSample(MISSING_FIELD, f"{where} has no content: 'content' and 'value' are missing or null")
        if isinstance(content, (list, tuple)):
            parts = [self._part(part, f"{where}, part {j}") for j, part in enumerate(content)]
        else:
            parts = self._parts_of_text(_text(content, f"{where}: {content_key!r}"))
        return {"role": ROLES[role.lower()], "content": parts}

    def _parts_of_text(self, text: str) -> list[dict]:
        """Text parts split at LLaVA's `<image>` (and our own placeholder) into text and image parts."""
        token = self.processor.image_token
        pieces = text.replace(LLAVA_IMAGE_PLACEHOLDER, token).split(token)
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        return [part for part in parts if part["type"] == "image" or part["text"]]

    @staticmethod
    def _part(part: Any, where: str) -> dict:
        if not isinstance(part, Mapping):
            raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is {_kind(part)}, not a dict with a type")
        kind = part.get("type")
        if kind == "text":
            return {"type": "text", "text": _text(part.get("text"), f"{where}: 'text'")}
        if kind == "image":
            # The image may travel with its part; the processor reads these keys, in this order.
            carried = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
            return {"type": "image"} if carried is None else {"type": "image", "image": carried}
        raise SkippedSample(MALFORMED_EXAMPLE, f"{where} has type {kind!r}; a part is of type 'text' or 'image'")

    def _load(self, image: Any, position: int):
        where = f"image {position}"
        if isinstance(image, Mapping):  # a `datasets` Image value with decoding off
            if not image.get("bytes") and not image.get("path"):
                raise SkippedSample(INVALID_IMAGE, f"{where} is {_kind(image)}, with neither 'bytes' nor 'path'")
            image = image.get("bytes") or image.get("path")
        if image is None:
            raise SkippedSample(INVALID_IMAGE, f"{where} is null")
        if isinstance(image, str) and self.image_root and "://" not in image:
            image = self._under_image_root(image, where)
        try:
            return load_image(
                image, max_pixels=self.processor.image_processor.max_image_pixels, max_bytes=self.max_image_bytes
            )
        except InvalidImageError as error:
            raise SkippedSample(INVALID_IMAGE, f"{where}: {error}") from error

    def _under_image_root(self, path: str, where: str) -> str:
        # normpath, not realpath: `../` and absolute paths in the data are what is refused, not symlinks in the root.
        joined = os.path.normpath(os.path.join(self.image_root, path))
        root = os.path.abspath(self.image_root)
        if not self.allow_paths_outside_image_root and os.path.commonpath([root, os.path.abspath(joined)]) != root:
            raise SkippedSample(
                PATH_OUTSIDE_IMAGE_ROOT,
                f"{where}: path {path!r} leads outside image_root {self.image_root!r}; allow it with "
                "allow_paths_outside_image_root if you trust the data set",
            )
        return joined


_logged_unexpected: set[str] = set()  # unexpected reasons already logged with a traceback, once per process


def _kind(value: Any) -> str:
    """A value's type and the start of its repr, for messages: "int 5", "dict {'from': None, ...}"."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _keys(example: Mapping) -> str:
    keys = sorted(map(str, example))
    return str(keys if len(keys) <= 12 else keys[:12] + ["..."])


def _text(value: Any, where: str) -> str:
    """A text field: None is no text; bytes (a webdataset `.caption`) must be UTF-8; anything else is refused."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is bytes that are not UTF-8: {error}") from error
    if not isinstance(value, str):
        raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is {_kind(value)}, not text")
    try:
        value.encode("utf-8")  # JSON's "\ud800" gives a lone surrogate, which no tokenizer takes
    except UnicodeEncodeError as error:
        raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is not valid Unicode: {error.reason}") from error
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise SkippedSample(MALFORMED_EXAMPLE, f"{where} is {_kind(value)}, not a list")
    return list(value)


def _images(value: Any) -> list:
    """An images field: a list, or one image on its own (LLaVA's `image`), or None for none."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
