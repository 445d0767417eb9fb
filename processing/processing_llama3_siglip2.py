"""The processor: text with `<|image|>` placeholders plus images in, exactly the model's inputs out.

Each placeholder becomes `<|begin_of_image|>` + `<|image|>` × n + `<|end_of_image|>`, where n is the image's token
count after the model's k×k merge, and the images become SigLIP2 NaFlex patches (see the image processor). Entry
points, all returning the same keys:

- `processor(text=..., images=..., **kwargs)`: a batch, for inference and plain captioning data. It takes the keyword
  arguments of transformers' processors (`padding`, `truncation`, `max_length`, `pad_to_multiple_of`, `padding_side`,
  `return_tensors`, `return_attention_mask`, `add_special_tokens`, `text_kwargs={...}`, `images_kwargs={...}`),
  merged by `ProcessorMixin._merge_kwargs`, plus `return_labels` and `split_special_tokens`;
- `processor.apply_chat_template(chats, tokenize=True, return_dict=True, ...)`: chats, with
  `return_assistant_tokens_mask=True` giving `assistant_masks` from the template's `{% generation %}` blocks;
- `processor.process_sample(text, images)`: one example, unpadded, for the packing collator;
- `processor.build_sft_sample(messages)`: one chat, with labels on the assistant turns only, for fine-tuning.

Text is data. A special-token string inside the text or a chat message (`<|end_of_text|>`, `<|eot_id|>`,
`<|begin_of_image|>`, ...) is encoded as the characters it is written with, never as that control token; only
`<|image|>` keeps its meaning, the place of an image. Control tokens come from the processor (bos, each image's boi and
eoi, `append_eos`) and from the chat template's own text (headers, `<|eot_id|>`). `split_special_tokens=False` opts
out, for trusted text whose special-token strings are meant, such as a prompt rendered by
`apply_chat_template(..., tokenize=False)`.

Truncation (`truncation=True, max_length=M`, on the tokenizer's `truncation_side`) cuts text only: where keeping M
tokens would drop any token of an image (its boi, image tokens or eoi), the call raises a ValueError naming the sample
and the length it needs. transformers' own processors raise too when truncation removes image tokens; the model must
never see part of an image, or an image without its tokens.

Shape letters: B samples, S tokens per sample (padded), N images in the batch, L patches per image, D values per patch.

This file travels to the Hub with the model: it imports only torch, numpy, transformers and its siblings.
"""

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_llama3_siglip2 import Llama3Siglip2ImagesKwargs
from .text_encoding import (
    STRAY_MARK,
    chat_segments,
    control_token_pattern,
    expand_image_tokens,
    mark_control_tokens,
    overlaps,
    pad_to,
    special_tokens_around,
    text_segments,
    tokenize_segments,
    truncate,
    truncation_on,
)

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<|image|>"
BEGIN_OF_IMAGE_TOKEN = "<|begin_of_image|>"
END_OF_IMAGE_TOKEN = "<|end_of_image|>"
PAD_TOKEN = "<|pad|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
# Llama 3.1+ tokenizers ship this reserved token for padding; using it adds no embedding row.
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
IGNORE_INDEX = -100

# Llama 3's template, with image parts and a `{% generation %}` block around what the assistant says (its text and
# <|eot_id|>, so that the model learns to stop): the tokens `return_assistant_tokens_mask` marks, where
# `build_sft_sample` puts labels.
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

# Tokenizer options the processor does not offer: each would return something the model cannot take.
_UNSUPPORTED_TEXT_KWARGS = (
    "text_pair", "text_target", "text_pair_target", "is_split_into_words", "return_overflowing_tokens", "stride",
    "return_special_tokens_mask", "return_length", "return_token_type_ids",
)
_IMAGE_PROCESSOR_KWARGS = (
    "patch_size", "merge_size", "min_patches", "max_patches", "image_mean", "image_std", "resample", "padding",
)
# Text kwargs that, passed flat, go to the tokenizer only: transformers would also hand `padding=True` or
# `max_length` to the image processor, whose `padding` means how to pad patches.
_TEXT_ONLY_KWARGS = frozenset(TextKwargs.__annotations__) - {
    "return_tensors", "return_mm_token_type_ids", "return_text_replacement_offsets",
}


class _ModalityKwargs(ProcessingKwargs, total=False):
    """What `_merge_kwargs` merges: transformers' per-modality kwargs, with our image processor's.

    Only modality dicts: transformers 5.17 validates every key of this class as one; `_defaults` is what it reads.
    """

    _defaults = {}  # noqa: RUF012 (TypedDict)
    images_kwargs: Llama3Siglip2ImagesKwargs


class Llama3Siglip2ProcessorKwargs(_ModalityKwargs, total=False):
    """The processor's call kwargs: transformers' (flat or in `text_kwargs` / `images_kwargs`) and three read here.

    split_special_tokens: encode special-token strings in the text as text (default True; see the module docstring).
    return_labels: also return `labels`, `input_ids` with image, boi, eoi and padding positions at -100.
    return_mm_token_type_ids: also return `mm_token_type_ids`, 1 on image tokens.
    """

    split_special_tokens: bool
    return_labels: bool
    return_mm_token_type_ids: bool


# Read by the processor itself, before transformers merges the rest (whose handling of flat keys varies by version).
_OWN_KWARGS = ("split_special_tokens", "return_labels", "return_mm_token_type_ids", "return_text_replacement_offsets")


_PROCESSOR_CALL_KWARGS = (
    frozenset(TextKwargs.__annotations__)
    | frozenset(ImagesKwargs.__annotations__)
    | frozenset(Llama3Siglip2ImagesKwargs.__annotations__)
    | frozenset(Llama3Siglip2ProcessorKwargs.__annotations__)
    | {"images"}  # apply_chat_template's images for image parts without one
)


class Llama3Siglip2Processor(ProcessorMixin):
    """A tokenizer and a `Llama3Siglip2ImageProcessor`, with the image tokens added to the tokenizer if missing.

    `image_token_id`, `boi_token_id`, `eoi_token_id` and `pad_token_id` are the ids the model config must carry.

    `save_pretrained` writes the tokenizer, `chat_template.jinja` and `processor_config.json`, in which transformers 5
    nests the image processor; both carry their `auto_map`, and this file and its siblings are copied alongside. There
    is deliberately no separate `preprocessor_config.json`: transformers reads the nested one first, and from a
    standalone one with an `AutoImageProcessor` auto_map its pipelines guess a remote video processor and stop to
    ask whether to trust remote code.
    """

    valid_processor_kwargs = _ModalityKwargs
    # Defaults of the kwargs the processor reads itself (`_OWN_KWARGS`).
    split_special_tokens = True
    return_labels = False

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
        if self.tokenizer.eos_token is None and self._token_id(END_OF_TEXT_TOKEN) is not None:
            self.tokenizer.eos_token = END_OF_TEXT_TOKEN  # the end of a sample, for `append_eos`

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Unpack[Llama3Siglip2ProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text` with each `<|image|>` expanded for its image, and process the images.

        Args:
            images: a flat list of images in placeholder order across the batch, or one list per sample, or one
                image. Anything `load_image` accepts.
            text: a string or a list of strings (the batch).
            **kwargs: `Llama3Siglip2ProcessorKwargs`: the tokenizer's `padding`, `truncation`, `max_length`,
                `pad_to_multiple_of`, `padding_side`, `add_special_tokens`, `return_attention_mask`,
                `return_offsets_mapping`, `return_tensors`; `images_kwargs` for the image processor (e.g.
                `{"padding": "longest"}`); `text_kwargs`; `return_mm_token_type_ids`; `return_labels`: also return
                `labels` (`input_ids` with image, boi, eoi and padding positions at -100); `split_special_tokens`
                (default True): special-token strings in `text` are text, `<|image|>` excepted.

        Returns `input_ids (B, S)`, `attention_mask (B, S)`, optionally `labels (B, S)`, and, when there are images,
        `pixel_values (N, L, D)`, `pixel_attention_mask (N, L)` and `spatial_shapes (N, 2)`.
        """
        if videos is not None or audio is not None:
            raise ValueError("Llama3Siglip2Processor takes text and images only, not videos or audio")
        settings, images_kwargs, split = self._call_settings(kwargs)
        if text is None:
            if images is None:
                raise ValueError("Llama3Siglip2Processor needs text, images or both")
            return BatchFeature(self._process_images(images, settings["return_tensors"], images_kwargs))
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise TypeError("text must be a string or a list of strings")
        images_per_sample = self._images_per_sample(texts, images)
        if split:
            self._warn_on_template_tokens(texts)
        samples = [text_segments(sample, self.image_token, split) for sample in texts]
        return self._encode_batch(samples, images_per_sample, images_kwargs, **settings)

    def process_sample(
        self,
        text: str,
        images: Sequence[Any] | None = None,
        add_special_tokens: bool = True,
        *,
        append_eos: bool = False,
        split_special_tokens: bool = True,
    ) -> BatchFeature:
        """One example for the packing collator: unpadded `(1, T)` tokens with `labels`, images padded to the longest.

        `labels` are `input_ids` with image, boi and eoi at -100. `append_eos` ends the sample with the tokenizer's
        eos token (a control token, labelled). Special-token strings in `text` are text, except `<|image|>` and one
        `eos_token` string at the very end, read as `append_eos=True`: the end marker the caption formats of the data
        pipeline append. Returns the keys of `__call__` (pixel keys only where there are images) as torch tensors.
        """
        eos = self.tokenizer.eos_token
        if split_special_tokens and eos and text.endswith(eos):
            text, append_eos = text[: -len(eos)], True
        if append_eos and eos is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token")
        images_per_sample = self._images_per_sample([text], [list(images or [])])
        segments = text_segments(text, self.image_token, split_special_tokens)
        if append_eos:
            segments.append(("token", eos, len(text)))
        return self._encode_batch(
            [segments],
            images_per_sample,
            {"padding": "longest"},
            add_special_tokens=add_special_tokens,
            return_labels=True,
            return_tensors="pt",
        )

    def build_sft_sample(
        self,
        messages: Sequence[dict],
        images: Sequence[Any] | None = None,
        chat_template: str | None = None,
        *,
        split_special_tokens: bool = True,
    ) -> BatchFeature:
        """One chat for supervised fine-tuning: `labels` on the assistant turns only, everything else -100.

        `messages` are `{"role", "content"}` dicts whose content is a string or a list of `{"type": "text", "text"}`
        and `{"type": "image"}` parts. An image part may carry its image under "image" (or "path"); the others take
        the next of `images`, in order. The labels cover what the chat template marks with `{% generation %}`: for
        the default template, the assistant's text and its `<|eot_id|>`. Special-token strings in the messages are
        text unless `split_special_tokens=False`. Returns the keys of `process_sample`.
        """
        template = self._resolve_template(chat_template)
        chat_images = _images_of_messages(messages, images)
        rendered, spans = self._render_chats([list(messages)], template, split_special_tokens, assistant_mask=True)
        if not spans[0]:
            raise ValueError(
                "the chat has no assistant turn to learn from (or the chat template has no {% generation %} block)"
            )
        out = self._encode_batch(
            [chat_segments(rendered[0])],
            [chat_images],
            {"padding": "longest"},
            generation_spans=spans,
            add_special_tokens=False,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
        )
        assistant = out.pop("assistant_masks").bool()
        labels = torch.where(assistant, out["input_ids"], torch.full_like(out["input_ids"], IGNORE_INDEX))
        return BatchFeature({"input_ids": out.pop("input_ids"), "attention_mask": out.pop("attention_mask"),
                             "labels": labels, **out})

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """Render one chat or a batch of chats with the chat template; with `tokenize=True`, also encode them.

        As transformers' `ProcessorMixin.apply_chat_template`, with the image token given to the template, a check
        that its `<|...|>` tokens are tokens of the tokenizer, and `split_special_tokens` (default True, in
        `processor_kwargs`): special-token strings in the messages are text, the template's own tokens control
        tokens. Images come from the image parts ("image", "path" or "url"), or, for parts without one, from
        `processor_kwargs["images"]` (a list per chat). `return_assistant_tokens_mask=True` (with `tokenize=True,
        return_dict=True`) adds `assistant_masks (B, S)`: 1 on the tokens inside the template's `{% generation %}`
        blocks, 0 elsewhere, on image tokens and on padding. Keyword arguments that are processor kwargs (`padding`,
        `truncation`, `max_length`, ...) go to the processor, the others to the template.
        """
        template = self._resolve_template(chat_template)
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        chats = [getattr(chat, "messages", chat) for chat in (conversation if batched else [conversation])]
        # As transformers does: a None-valued key (OpenAI's content=None, a missing column in a dataset) is absent.
        chats = [[{k: v for k, v in message.items() if v is not None} for message in chat] for chat in chats]
        processor_kwargs = dict(processor_kwargs or {})
        template_kwargs = {}
        for key, value in kwargs.items():
            (processor_kwargs if key in _PROCESSOR_CALL_KWARGS else template_kwargs)[key] = value
        render = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, **template_kwargs)
        if not tokenize:
            rendered, _ = self._render_chats(chats, template, False, **render)
            return rendered if batched else rendered[0]

        given_images = processor_kwargs.pop("images", None)
        given_per_chat = given_images if batched and given_images is not None else [given_images] * len(chats)
        chat_images = [_images_of_messages(chat, given) for chat, given in zip(chats, given_per_chat)]
        if return_tensors not in (None, "auto"):
            processor_kwargs["return_tensors"] = return_tensors
        settings, images_kwargs, split = self._call_settings(processor_kwargs)
        rendered, spans = self._render_chats(chats, template, split, return_assistant_tokens_mask, **render)
        bos = self.tokenizer.bos_token
        if bos and all(STRAY_MARK.sub("", chat).startswith(bos) for chat in rendered):
            settings["add_special_tokens"] = False  # the template wrote it
        out = self._encode_batch(
            [chat_segments(chat) for chat in rendered],
            chat_images,
            images_kwargs,
            generation_spans=spans if return_assistant_tokens_mask else None,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            **settings,
        )
        return out if return_dict else out["input_ids"]

    # Settings and templates.

    def _call_settings(self, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Merge call kwargs the transformers way; returns (text settings for `_encode_batch`, image kwargs, split)."""
        kwargs = dict(kwargs)
        nested_text = dict(kwargs.pop("text_kwargs", None) or {})
        own = {key: nested_text.pop(key) for key in _OWN_KWARGS if key in nested_text}
        for key in _OWN_KWARGS:
            if key in kwargs:
                if key in own:
                    raise ValueError(f"{key} given both as a keyword argument and in text_kwargs")
                own[key] = kwargs.pop(key)
        if own.get("return_text_replacement_offsets"):
            raise ValueError("Llama3Siglip2Processor does not support return_text_replacement_offsets")
        flat_text = {key: kwargs.pop(key) for key in list(kwargs) if key in _TEXT_ONLY_KWARGS}
        if twice := sorted(set(nested_text) & set(flat_text)):
            raise ValueError(f"{', '.join(twice)} given both as a keyword argument and in text_kwargs")
        if nested_text or flat_text:
            kwargs["text_kwargs"] = {**nested_text, **flat_text}
        explicit_image_kwargs = dict(kwargs.get("images_kwargs") or {})
        merged = self._merge_kwargs(_ModalityKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = dict(merged["text_kwargs"])
        if unsupported := sorted(key for key in _UNSUPPORTED_TEXT_KWARGS if text_kwargs.get(key)):
            raise ValueError(f"Llama3Siglip2Processor does not support {', '.join(unsupported)}")
        settings = {
            key: text_kwargs[key]
            for key in ("add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of",
                        "padding_side", "return_attention_mask", "return_offsets_mapping", "return_tensors")
            if text_kwargs.get(key) is not None
        }
        settings.setdefault("return_tensors", merged["images_kwargs"].get("return_tensors"))
        settings["return_labels"] = bool(own.get("return_labels", self.return_labels))
        settings["return_mm_token_type_ids"] = bool(own.get("return_mm_token_type_ids"))
        # Only what the image processor takes; its `padding` only from `images_kwargs` (see _TEXT_ONLY_KWARGS).
        images_kwargs = {
            key: value for key, value in merged["images_kwargs"].items()
            if key in _IMAGE_PROCESSOR_KWARGS and key != "padding" and value is not None
        }
        if "padding" in explicit_image_kwargs:
            images_kwargs["padding"] = explicit_image_kwargs["padding"]
        return settings, images_kwargs, bool(own.get("split_special_tokens", self.split_special_tokens))

    def _resolve_template(self, chat_template: str | None) -> str:
        """`chat_template` (a template, or the name of one of the processor's), else the processor's ("default"
        where it has several), checked by `_check_template_tokens`."""
        templates = self.chat_template
        if isinstance(templates, dict):
            template = templates.get(chat_template or "default", chat_template)
        else:
            template = chat_template or templates
        if template is None:
            names = f" (it has {', '.join(templates)})" if isinstance(templates, dict) else ""
            raise ValueError(f"no chat template given and the processor has no default one{names}")
        self._check_template_tokens(template)
        return template

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

    def _render_chats(self, chats, template: str, mark: bool, assistant_mask: bool = False, **render):
        """The chats through the template; with `mark`, their special-token strings wrapped for `chat_segments`."""
        if mark:
            pattern = self._cached("control_tokens", lambda: control_token_pattern(self.tokenizer, self.image_token))
            chats = [mark_control_tokens(chat, pattern) for chat in chats]
        return render_jinja_template(
            conversations=chats,
            chat_template=template,
            return_assistant_tokens_mask=assistant_mask,
            **{**self._template_kwargs(), **render},
        )

    def _cached(self, name: str, compute):
        """`compute()`, kept until the tokenizer changes: its vocabulary size or its bos/eos settings."""
        tokenizer = self.tokenizer
        key = (len(tokenizer), getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
        cache = self.__dict__.setdefault("_tokenizer_cache", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = key, compute()
        return cache[name][1]

    def _special_tokens_around(self) -> tuple[list[int], list[int]]:
        return self._cached("around", lambda: special_tokens_around(self.tokenizer))

    def _warn_on_template_tokens(self, texts: list[str]) -> None:
        if not isinstance(self.chat_template, str):
            return
        structural = set(_TEMPLATE_LITERAL_TOKENS.findall(self.chat_template)) - {self.image_token}
        found = sorted(token for token in structural if any(token in sample for sample in texts))
        if found:
            logger.warning_once(
                f"the text contains {', '.join(found)}, encoded as plain text, not as control tokens: text is data "
                f"(split_special_tokens=True, the default). For a prompt rendered by apply_chat_template, call "
                f"apply_chat_template(..., tokenize=True), or pass split_special_tokens=False for trusted text."
            )

    # Encoding.

    def _encode_batch(
        self,
        samples: list[list[tuple[str, str, int]]],
        images_per_sample: list[list[Any]],
        images_kwargs: dict[str, Any],
        *,
        generation_spans: list[list[tuple[int, int]]] | None = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_offsets_mapping: bool | None = False,
        return_labels: bool = False,
        return_assistant_tokens_mask: bool = False,
        return_mm_token_type_ids: bool = False,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        image_data: dict[str, Any] = {}
        tokens_per_image: list[int] = []
        flat_images = [image for sample_images in images_per_sample for image in sample_images]
        if flat_images:
            image_data = self._process_images(flat_images, return_tensors, images_kwargs)
            tokens_per_image = self.image_processor.num_image_tokens(
                image_data["spatial_shapes"], images_kwargs.get("merge_size")
            )
        around = self._special_tokens_around() if add_special_tokens else ([], [])
        rows = tokenize_segments(
            self.tokenizer, samples, around, with_offsets=bool(return_assistant_tokens_mask or return_offsets_mapping)
        )
        for index, (row, sample_images) in enumerate(zip(rows, images_per_sample)):
            if (found := row.ids.count(self.image_token_id)) != len(sample_images):
                raise ValueError(
                    f"sample {index}: {len(sample_images)} images but the tokenizer produced {found} "
                    f"{self.image_token} tokens; is {self.image_token} a special token of the tokenizer?"
                )
        expand_image_tokens(rows, tokens_per_image, self.image_token_id, self.boi_token_id, self.eoi_token_id)
        if truncation_on(truncation):
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            side = self.tokenizer.truncation_side
            rows = [truncate(row, limit, side, index) for index, row in enumerate(rows)]

        pads_to_max_length = getattr(padding, "value", padding) == "max_length"
        padded = self.tokenizer.pad(
            {"input_ids": [row.ids for row in rows]},
            padding=padding,
            max_length=max_length if pads_to_max_length else None,  # truncation is ours, done above
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=True,
        )
        side = padding_side or self.tokenizer.padding_side
        text_data = {"input_ids": padded["input_ids"]}
        if return_attention_mask is not False:
            text_data["attention_mask"] = padded["attention_mask"]
        per_token: dict[str, tuple[list[list[Any]], Any]] = {}
        if return_labels:
            per_token["labels"] = [
                [IGNORE_INDEX if image else token for token, image in zip(row.ids, row.in_image)] for row in rows
            ], IGNORE_INDEX
        if return_assistant_tokens_mask:
            spans = generation_spans or [[] for _ in rows]
            per_token["assistant_masks"] = [
                [int(not image and overlaps(offset, sample_spans)) for offset, image in zip(row.offsets, row.in_image)]
                for row, sample_spans in zip(rows, spans)
            ], 0
        if return_mm_token_type_ids:
            per_token["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in row.ids] for row in rows], 0
        if return_offsets_mapping:
            per_token["offset_mapping"] = [row.offsets for row in rows], (0, 0)
        for name, (values, fill) in per_token.items():
            text_data[name] = [pad_to(v, len(ids), fill, side) for v, ids in zip(values, padded["input_ids"])]
        return BatchFeature({**BatchFeature(text_data, tensor_type=return_tensors), **image_data})

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
        return [list(images[start:end]) for start, end in itertools.pairwise(starts)]


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

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Llama3Siglip2Processor", "Llama3Siglip2ProcessorKwargs"]
