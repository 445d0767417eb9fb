"""transformers' Trainer and TRL's SFTTrainer train the model on an `{"images", "messages"}` chat data set.

Trainer needs our collator and `remove_unused_columns=False`; SFTTrainer needs nothing but `processing_class=processor`
(its vision-language collator calls `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from processing.chat_collator import Llama3Siglip2ChatCollator

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
STEPS = 8
COMMON = {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1,
          "report_to": "none", "save_strategy": "no", "use_cpu": True, "seed": 0}


@pytest.fixture
def model_and_processor(tiny_llama_dir, tiny_siglip2_dir):
    """A fresh model each time: training must not touch the session's shared `built` fixture."""
    from modeling_llama3_siglip2 import from_pretrained_components

    torch.manual_seed(0)
    return from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_dir), max_patches=64)


@pytest.fixture
def chats():
    """TRL's vision-language layout: string contents, the images in their own column."""
    import datasets

    names = list(COLOURS)
    rows = [
        {
            "images": [Image.new("RGB", (16, 16), COLOURS[names[i % 4]])],
            "messages": [
                {"role": "user", "content": "What colour is the box?"},
                {"role": "assistant", "content": f"A {names[i % 4]} box."},
            ],
        }
        for i in range(32)
    ]
    return datasets.Dataset.from_list(rows)


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_learns(losses: list[float]) -> None:
    assert len(losses) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


def labelled_text(processor, batch, row: int = 0) -> str:
    return processor.tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100])


def test_chat_collator_labels_only_what_the_assistant_says(model_and_processor, chats):
    _, processor = model_and_processor
    batch = Llama3Siglip2ChatCollator(processor)([chats[0], chats[1]])
    assert labelled_text(processor, batch, 0) == "A red box.<|eot_id|>"
    assert labelled_text(processor, batch, 1) == "A blue box.<|eot_id|>"
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * 16  # 16×16 pixels, 4-pixel patches
    assert batch["pixel_values"].shape[0] == 2


def test_transformers_trainer_lowers_the_loss_with_the_chat_collator(model_and_processor, chats, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = model_and_processor
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, **COMMON),
        train_dataset=chats,
        data_collator=Llama3Siglip2ChatCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    assert_learns(losses_of(trainer))


def test_trl_sft_trainer_lowers_the_loss_with_assistant_only_loss(model_and_processor, chats, tmp_path):
    trl = pytest.importorskip("trl")

    model, processor = model_and_processor
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **COMMON),
        train_dataset=chats,
        processing_class=processor,
    )
    assert labelled_text(processor, trainer.data_collator([chats[2]])) == "A green box.<|eot_id|>"
    trainer.train()
    assert_learns(losses_of(trainer))
