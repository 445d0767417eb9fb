"""A data collator for chat data sets of `{"images", "messages"}` rows, for `transformers.Trainer`.

    trainer = Trainer(model, TrainingArguments(..., remove_unused_columns=False), train_dataset=chats,
                      data_collator=Llama3Siglip2ChatCollator(processor))

(`remove_unused_columns=False` because Trainer would otherwise drop the `images` and `messages` columns, which are
not arguments of the model's forward.) Rows are laid out as TRL's vision-language data sets are: `messages` is a list
of `{"role", "content"}` dicts, content a string or a list of `{"type": "text"|"image", ...}` parts, and `images` a
list of images (or `image`, one). Image parts without an image of their own take the row's images in order; a chat
with no image parts gets all of its images before the text of its first user message, as TRL's
`prepare_multimodal_messages` places them.

This module is not Hub-travelling: it is training code, and imports the processor only through its interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


class Llama3Siglip2ChatCollator:
    """`collator(rows) -> batch` with `input_ids`, `attention_mask`, `labels` and the pixel keys, padded.

    Args:
        processor: a `Llama3Siglip2Processor`.
        max_length: truncate longer chats to this many tokens (never through an image: the processor raises).
        assistant_only_loss: labels on what the assistant says only (the chat template's `{% generation %}` blocks:
            its text and `<|eot_id|>`); False puts them on every text token.
        messages_key, images_key: the columns to read.

    Labels are -100 on padding, on the image tokens and their boi/eoi, and outside the assistant turns.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        assistant_only_loss: bool = True,
        messages_key: str = "messages",
        images_key: str = "images",
    ):
        self.processor = processor
        self.max_length = max_length
        self.assistant_only_loss = assistant_only_loss
        self.messages_key, self.images_key = messages_key, images_key

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        chats, images = [], []
        for row in rows:
            row_images = row.get(self.images_key)
            if row_images is None and row.get("image") is not None:
                row_images = [row["image"]]
            row_images = list(row_images or [])
            chats.append(with_image_parts(row[self.messages_key], len(row_images)))
            images.append(row_images)
        batch = self.processor.apply_chat_template(
            chats,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=self.assistant_only_loss,
            processor_kwargs={
                "images": images,
                "padding": True,
                "truncation": self.max_length is not None,
                "max_length": self.max_length,
                "images_kwargs": {"padding": "longest"},
            },
        )
        input_ids = batch["input_ids"]
        never_targets = torch.tensor(
            [self.processor.image_token_id, self.processor.boi_token_id, self.processor.eoi_token_id]
        )
        ignored = (batch["attention_mask"] == 0) | torch.isin(input_ids, never_targets)
        if self.assistant_only_loss:
            ignored |= batch.pop("assistant_masks") == 0
        batch["labels"] = input_ids.masked_fill(ignored, IGNORE_INDEX)
        return dict(batch)


def with_image_parts(messages: Sequence[Mapping[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """`messages` as they are if any has an image part; otherwise with `n_images` image parts put before the text
    of the first user message (TRL's rule)."""
    messages = [dict(message) for message in messages]
    has_parts = any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"]) for m in messages
    )
    if has_parts or n_images == 0:
        return messages
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            message["content"] = [{"type": "image"} for _ in range(n_images)] + parts
            return messages
    raise ValueError(f"{n_images} images but the chat has no user message to put them in")
