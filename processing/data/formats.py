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

An image may come as a PIL image, bytes, a path (relative to `image_root` if given) or a `datasets` Image value
`{"bytes", "path"}`. Images are decoded here, in the loader's workers, with the processor's `load_image`.

A bad example raises `SkippedSample` with one of `SKIP_REASONS`; the pipeline counts it, or raises
`BadSampleError` in strict mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..collator import EMPTY_TEXT, TOO_LONG, TOO_MANY_IMAGES, PackedSample, to_packed_sample
from ..image_loading import InvalidImageError, load_image

INVALID_IMAGE = "invalid_image"  # undecodable, truncated, a bomb, an extreme aspect ratio, a URL, missing
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
PROCESSOR_ERROR = "processor_error"  # any other ValueError the processor raises for this example
SKIP_REASONS = (INVALID_IMAGE, PLACEHOLDER_MISMATCH, TOO_LONG, TOO_MANY_IMAGES, EMPTY_TEXT, PROCESSOR_ERROR)

FORMATS = ("caption", "interleaved", "chat", "text")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("text", "txt", "caption")
LLAVA_IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


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
        if fmt not in FORMATS:
            raise ValueError(
                f"cannot tell the sample format from the columns {sorted(names)}; set format to one of {FORMATS} "
                "and name the columns (image_column, text_column, images_column, texts_column, messages_column)"
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
            raise ValueError(f"format {fmt!r} needs columns that {sorted(names)} lack; name them in the data config")
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


class SampleMaker:
    """`maker(example, name) -> PackedSample`, or `SkippedSample` with its reason.

    `name` says which example it is in error messages (e.g. "example 1834 of rank 3's shard").
    """

    def __init__(
        self,
        processor,
        columns: ColumnMap,
        seq_len: int,
        max_images: int | None = None,
        image_root: str | None = None,
        append_eos: bool = True,
    ):
        self.processor, self.columns, self.seq_len = processor, columns, seq_len
        self.max_images, self.image_root = max_images, image_root
        # Without an end token the model never learns to stop; chat templates end turns themselves.
        self.text_end = (processor.tokenizer.eos_token or "") if append_eos else ""

    def __call__(self, example: Mapping, name: str = "example") -> PackedSample:
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
        images = [self._load(image) for image in raw_images]
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

    def _check_text(self, text: str, image_count: int) -> None:
        token = self.processor.image_token
        if not text.replace(token, "").strip():
            raise SkippedSample(EMPTY_TEXT, "no text besides image placeholders")
        if text.count(token) != image_count:
            raise SkippedSample(
                PLACEHOLDER_MISMATCH, f"{text.count(token)} {token} placeholders but {image_count} images"
            )

    def _caption(self, example: Mapping) -> tuple[str, list]:
        image, caption = example[self.columns.image], example[self.columns.text]
        return self.processor.image_token + (caption or ""), [] if image is None else [image]

    def _text(self, example: Mapping) -> tuple[str, list]:
        return example[self.columns.text] or "", [image for image in example[self.columns.images] or []]

    def _interleaved(self, example: Mapping) -> tuple[str, list]:
        texts, images = example[self.columns.texts] or [], example[self.columns.images] or []
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
                pieces.append(separator + text)
        return "".join(pieces), kept_images

    def _chat(self, example: Mapping) -> tuple[list[dict], list]:
        """Messages whose image parts are all bare, and the chat's images in the order of those parts."""
        given = example.get(self.columns.images) if self.columns.images else None
        given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        messages = [self._message(message) for message in example[self.columns.messages] or []]
        parts = [
            p for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image"
        ]
        carried = [part.pop("image", None) or part.pop("path", None) for part in parts]
        bare = carried.count(None)
        if bare != len(given):
            raise SkippedSample(PLACEHOLDER_MISMATCH, f"{bare} image parts without an image but {len(given)} images")
        given_in_order = iter(given)
        images = [image if image is not None else next(given_in_order) for image in carried]
        said = [_text_of(m["content"]).strip() for m in messages if m["role"] == "assistant"]
        if not any(said):
            raise SkippedSample(EMPTY_TEXT, "no assistant turn with text to learn from")
        return messages, images

    def _message(self, message: Mapping) -> dict:
        """A chat message in the processor's form: role and content parts; LLaVA's `from`/`value` converted."""
        role = LLAVA_ROLES.get(message.get("role") or message.get("from"), message.get("role") or message.get("from"))
        content = message.get("content", message.get("value"))
        if isinstance(content, str):
            pieces = content.replace(LLAVA_IMAGE_PLACEHOLDER, self.processor.image_token).split(
                self.processor.image_token
            )
            content = [{"type": "text", "text": pieces[0]}]
            for piece in pieces[1:]:
                content += [{"type": "image"}, {"type": "text", "text": piece}]
            content = [part for part in content if part["type"] == "image" or part["text"]]
        elif isinstance(content, list):
            # Columns stored by `datasets` carry every key of every part, None where a part lacks it.
            content = [{key: value for key, value in part.items() if value is not None} for part in content]
        return {"role": role, "content": content}

    def _load(self, image: Any):
        if isinstance(image, Mapping):  # a `datasets` Image value with decoding off
            image = image.get("bytes") or image.get("path")
        if image is None:
            raise SkippedSample(INVALID_IMAGE, "the image is missing")
        if isinstance(image, str) and self.image_root and not os.path.isabs(image) and "://" not in image:
            image = os.path.join(self.image_root, image)
        try:
            return load_image(image, max_pixels=self.processor.image_processor.max_image_pixels)
        except InvalidImageError as error:
            raise SkippedSample(INVALID_IMAGE, str(error)) from error


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if part.get("type") == "text")
