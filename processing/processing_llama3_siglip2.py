"""The processor: text with `<|image|>` placeholders plus images in, exactly the model's inputs out.

Each placeholder becomes `<|begin_of_image|>` + `<|image|>` × n + `<|end_of_image|>`, where n is the image's token
count after the model's k×k merge, and the images become SigLIP2 NaFlex patches (see the image processor). Three
entry points, all returning the same keys:

- `processor(text=..., images=...)`: a batch, for inference and plain captioning data;
- `processor.process_sample(text, images)`: one example, unpadded, for the packing collator;
- `processor.build_sft_sample(messages)`: one chat, with labels on the assistant turns only, for fine-tuning.

Shape letters: B samples, S tokens per sample (padded), N images in the batch, L patches per image, D values per patch.

This file travels to the Hub with the model: it imports only torch, numpy, transformers and its siblings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils.chat_template_utils import render_jinja_template

IMAGE_TOKEN = "<|image|>"
BEGIN_OF_IMAGE_TOKEN = "<|begin_of_image|>"
END_OF_IMAGE_TOKEN = "<|end_of_image|>"
PAD_TOKEN = "<|pad|>"
# Llama 3.1+ tokenizers ship this reserved token for padding; using it adds no embedding row.
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
IGNORE_INDEX = -100

# Llama 3's template, with image parts and a `{% generation %}` block around what the assistant says (its text and
# <|eot_id|>, so that the model learns to stop), which is where `build_sft_sample` puts labels.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content | trim }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ image_token }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render_content(message['content']) }}<|eot_id|>{% endgeneration %}"
    "{%- else -%}{{- render_content(message['content']) + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
_TEMPLATE_LITERAL_TOKENS = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class Llama3Siglip2Processor(ProcessorMixin):
    """A tokenizer and a `Llama3Siglip2ImageProcessor`, with the image tokens added to the tokenizer if missing.

    `image_token_id`, `boi_token_id`, `eoi_token_id` and `pad_token_id` are the ids the model config must carry.

    `save_pretrained` writes the tokenizer, `chat_template.jinja` and `processor_config.json`, in which transformers 5
    nests the image processor; both carry their `auto_map`, and this file and its siblings are copied alongside. There
    is deliberately no separate `preprocessor_config.json`: transformers reads the nested one first, and from a
    standalone one with an `AutoImageProcessor` auto_map its pipelines guess a remote video processor and stop to
    ask whether to trust remote code.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        boi_token: str = BEGIN_OF_IMAGE_TOKEN,
        eoi_token: str = END_OF_IMAGE_TOKEN,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("Llama3Siglip2Processor needs both an image_processor and a tokenizer")
        self.image_token, self.boi_token, self.eoi_token = image_token, boi_token, eoi_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)
        self._add_missing_special_tokens()
        self.image_token_id = self._token_id(image_token)
        self.boi_token_id = self._token_id(boi_token)
        self.eoi_token_id = self._token_id(eoi_token)
        self.pad_token_id = tokenizer.pad_token_id

    def _token_id(self, token: str) -> int | None:
        """The id of `token` as one token of the vocabulary, or None where the tokenizer does not have it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            return None
        return token_id

    def _add_missing_special_tokens(self) -> None:
        # A Llama checkpoint's tokenizer has no image tokens; the model builder grows the embeddings to match.
        missing = [t for t in (self.image_token, self.boi_token, self.eoi_token) if self._token_id(t) is None]
        if self.tokenizer.pad_token is None:
            if self._token_id(LLAMA3_PAD_TOKEN) is not None:
                self.tokenizer.pad_token = LLAMA3_PAD_TOKEN
            else:
                missing.append(PAD_TOKEN)
        if missing:
            self.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = PAD_TOKEN

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        *,
        return_tensors: str | None = None,
        return_labels: bool = False,
        padding: bool | str = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        images_kwargs: dict | None = None,
    ) -> BatchFeature:
        """Tokenize `text` with each `<|image|>` expanded for its image, and process the images.

        Args:
            images: a flat list of images in placeholder order across the batch, or one list per sample, or one
                image. Anything `load_image` accepts.
            text: a string or a list of strings (the batch).
            return_labels: also return `labels`: `input_ids` with image, boi, eoi and padding positions at -100.
            padding, max_length, pad_to_multiple_of, padding_side: as for the tokenizer.
            images_kwargs: passed to the image processor, e.g. `{"padding": "longest"}`.

        Returns `input_ids (B, S)`, `attention_mask (B, S)`, optionally `labels (B, S)`, and, when there are images,
        `pixel_values (N, L, D)`, `pixel_attention_mask (N, L)` and `spatial_shapes (N, 2)`.
        """
        if videos is not None or audio is not None:
            raise ValueError("Llama3Siglip2Processor takes text and images only, not videos or audio")
        images_kwargs = dict(images_kwargs or {})
        if text is None:
            if images is None:
                raise ValueError("Llama3Siglip2Processor needs text, images or both")
            return BatchFeature(self._process_images(images, return_tensors, images_kwargs))
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise TypeError("text must be a string or a list of strings")
        images_per_sample = self._images_per_sample(texts, images)

        data: dict[str, Any] = {}
        tokens_per_image: list[int] = []
        flat_images = [image for sample in images_per_sample for image in sample]
        if flat_images:
            data = self._process_images(flat_images, return_tensors, images_kwargs)
            tokens_per_image = self.image_processor.num_image_tokens(
                data["spatial_shapes"], images_kwargs.get("merge_size")
            )
        token_rows = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        # Every text token is its own label; the expansion puts -100 on the image tokens.
        rows, labels = self._expand_image_tokens(token_rows, token_rows, images_per_sample, tokens_per_image)

        padded = self.tokenizer.pad(
            {"input_ids": rows},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
        )
        side = padding_side or self.tokenizer.padding_side
        text_data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        if return_labels:
            text_data["labels"] = [
                _pad_labels(row_labels, len(row), side) for row_labels, row in zip(labels, padded["input_ids"])
            ]
        return BatchFeature({**BatchFeature(text_data, tensor_type=return_tensors), **data})

    def process_sample(self, text: str, images: Sequence[Any] | None = None, add_special_tokens: bool = True):
        """One example for the packing collator: unpadded `(1, T)` tokens with `labels`, images padded to the longest.

        `labels` are `input_ids` with image, boi and eoi at -100. Returns the keys of `__call__` (pixel keys only
        where there are images) as torch tensors.
        """
        return self(
            text=[text],
            images=[list(images or [])],
            return_tensors="pt",
            return_labels=True,
            add_special_tokens=add_special_tokens,
            images_kwargs={"padding": "longest"},
        )

    def build_sft_sample(
        self,
        messages: Sequence[dict],
        images: Sequence[Any] | None = None,
        chat_template: str | None = None,
    ) -> BatchFeature:
        """One chat for supervised fine-tuning: `labels` on the assistant turns only, everything else -100.

        `messages` are `{"role", "content"}` dicts whose content is a string or a list of `{"type": "text", "text"}`
        and `{"type": "image"}` parts. An image part may carry its image under "image" (or "path"); the others take
        the next of `images`, in order. The labels cover what the chat template marks with `{% generation %}`: for
        the default template, the assistant's text and its `<|eot_id|>`. Returns the keys of `process_sample`.
        """
        template = chat_template or self.chat_template
        self._check_template_tokens(template)
        chat_images = _images_of_messages(messages, images)
        rendered, generation_spans = render_jinja_template(
            conversations=[list(messages)],
            chat_template=template,
            return_assistant_tokens_mask=True,
            **self._template_kwargs(),
        )
        if not generation_spans[0]:
            raise ValueError(
                "the chat has no assistant turn to learn from (or the chat template has no {% generation %} block)"
            )
        encoding = self.tokenizer(rendered[0], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        labels = [
            token if token != self.image_token_id and _overlaps(offset, generation_spans[0]) else IGNORE_INDEX
            for token, offset in zip(ids, offsets)
        ]
        data: dict[str, Any] = {}
        tokens_per_image: list[int] = []
        if chat_images:
            data = self._process_images(chat_images, "pt", {"padding": "longest"})
            tokens_per_image = self.image_processor.num_image_tokens(data["spatial_shapes"])
        rows, label_rows = self._expand_image_tokens([ids], [labels], [chat_images], tokens_per_image)
        text_data = {"input_ids": rows, "attention_mask": [[1] * len(rows[0])], "labels": label_rows}
        return BatchFeature({**BatchFeature(text_data, tensor_type="pt"), **data})

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template`, with our image token in the template and a check of its tokens.

        For labels on assistant turns use `build_sft_sample`: the image-token expansion happens after
        tokenization here, which transformers' `return_assistant_tokens_mask` does not follow in every version.
        """
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("return_assistant_tokens_mask is not supported; use processor.build_sft_sample(messages)")
        template = chat_template or self.chat_template
        self._check_template_tokens(template)
        if isinstance(template, str) and "image_token" in template:
            # Only for templates that read it: transformers hands other unknown kwargs on to `__call__`.
            kwargs.setdefault("image_token", self.image_token)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _template_kwargs(self) -> dict[str, Any]:
        return {**self.tokenizer.special_tokens_map, "image_token": self.image_token}

    def _check_template_tokens(self, template: str | None) -> None:
        """Every `<|...|>` token a template writes, and its bos/eos, must be one token of the tokenizer."""
        if not isinstance(template, str):
            return
        missing = [t for t in sorted(set(_TEMPLATE_LITERAL_TOKENS.findall(template))) if self._token_id(t) is None]
        missing += [
            name for name in ("bos_token", "eos_token") if name in template and getattr(self.tokenizer, name) is None
        ]
        if missing:
            raise ValueError(
                f"the chat template uses {', '.join(missing)}, which the tokenizer does not have as special tokens; "
                f"use a Llama 3 tokenizer or pass a chat_template written for this one"
            )

    def _process_images(self, images: Any, return_tensors: str | None, images_kwargs: dict) -> dict[str, Any]:
        processed = self.image_processor(images, return_tensors=return_tensors, **images_kwargs)
        # grid_thw is the image processor's description of the layout; the model takes spatial_shapes instead.
        return {name: processed[name] for name in self.image_processor.model_input_names}

    def _images_per_sample(self, texts: list[str], images: Any) -> list[list[Any]]:
        """Split `images` into one list per sample, checking them against the placeholders of each text."""
        placeholders = [sample.count(self.image_token) for sample in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if any(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"images has {len(images)} lists (one per sample) but text has {len(texts)} samples")
            per_sample = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
            for index, (count, sample_images) in enumerate(zip(placeholders, per_sample)):
                if count != len(sample_images):
                    raise ValueError(
                        f"sample {index}: {count} {self.image_token} placeholders in the text but "
                        f"{len(sample_images)} images"
                    )
            return per_sample
        if sum(placeholders) != len(images):
            raise ValueError(
                f"{sum(placeholders)} {self.image_token} placeholders in the text (per sample: {placeholders}) but "
                f"{len(images)} images"
            )
        starts = np.cumsum([0, *placeholders]).tolist()
        return [list(images[start:end]) for start, end in zip(starts[:-1], starts[1:])]

    def _expand_image_tokens(
        self,
        token_rows: list[list[int]],
        label_rows: list[list[int]],
        images_per_sample: list[list[Any]],
        tokens_per_image: list[int],
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Replace the i-th `<|image|>` id with boi + image × tokens_per_image[i] + eoi (labels: all -100)."""
        counts = iter(tokens_per_image)
        expanded_rows, expanded_labels = [], []
        for index, (row, labels, sample_images) in enumerate(zip(token_rows, label_rows, images_per_sample)):
            found = row.count(self.image_token_id)
            if found != len(sample_images):
                raise ValueError(
                    f"sample {index}: {len(sample_images)} images but the tokenizer produced {found} "
                    f"{self.image_token} tokens; is {self.image_token} a special token of the tokenizer?"
                )
            new_row, new_labels = [], []
            for token, label in zip(row, labels):
                if token == self.image_token_id:
                    n = next(counts)
                    new_row += [self.boi_token_id] + [self.image_token_id] * n + [self.eoi_token_id]
                    new_labels += [IGNORE_INDEX] * (n + 2)
                else:
                    new_row.append(token)
                    new_labels.append(label)
            expanded_rows.append(new_row)
            expanded_labels.append(new_labels)
        return expanded_rows, expanded_labels


def _pad_labels(labels: list[int], length: int, side: str) -> list[int]:
    padding = [IGNORE_INDEX] * (length - len(labels))
    return padding + labels if side == "left" else labels + padding


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def _images_of_messages(messages: Sequence[dict], images: Sequence[Any] | None) -> list[Any]:
    """The images of a chat in order: those carried by image parts, the others taken from `images` in turn."""
    given = list(images or [])
    found, used = [], 0
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") != "image":
                continue
            carried = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
            if carried is None:
                if used == len(given):
                    raise ValueError(f"the chat has more image parts than the {len(given)} images given")
                carried, used = given[used], used + 1
            found.append(carried)
    if used != len(given):
        raise ValueError(f"{len(given)} images given but the chat's image parts took only {used} of them")
    return found


Llama3Siglip2Processor.register_for_auto_class("AutoProcessor")

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Llama3Siglip2Processor"]
