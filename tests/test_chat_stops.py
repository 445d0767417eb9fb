"""A chat model trained by examples/train.py (sft_chat.yaml) ends its answer with <|eot_id|> and generation stops there.

The base is the tiny composed model of conftest.py (`from_pretrained_components`, whose generation config ends at
<|end_of_text|> and <|eot_id|>), saved and fine-tuned by the training script on a small chat set about box colours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import fresh_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
MAX_NEW_TOKENS = 32


def write_chat_set(folder: Path, rows: int = 64) -> Path:
    """LLaVA-style jsonl rows: a user turn with `<image>` and a question, an assistant turn naming the colour."""
    names = list(COLOURS)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (16, 16), rgb).save(folder / f"{name}.png")
    lines = []
    for i in range(rows):
        name = names[i % len(names)]
        chat = [{"role": "user", "content": "<image>What colour is the box?"},
                {"role": "assistant", "content": f"A {name} box."}]
        lines.append(json.dumps({"messages": chat, "images": [str(folder / f"{name}.png")]}))
    path = folder / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_train(*args):
    import train

    with fresh_accelerate_state():
        return train.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama_dir, tiny_siglip2_dir):
    from modeling_llama3_siglip2 import from_pretrained_components

    folder = tmp_path_factory.mktemp("chat-stops")
    base = folder / "base"
    model, processor = from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_dir), max_patches=64)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    report = run_train(
        "--config", EXAMPLES / "configs" / "sft_chat.yaml",
        "--model_name_or_path", base, "--data_files", write_chat_set(folder), "--output_dir", folder / "out",
        "--train_parts", "all", "--seq_len", 128, "--rows_per_batch", 2, "--gradient_accumulation_steps", 1,
        "--num_workers", 0, "--max_steps", 30, "--learning_rate", 3e-3, "--warmup_steps", 4,
        "--checkpoint_every", 0, "--report_to", "none",
    )
    return folder / "out" / "final", report


def generate_answer(final: Path, colour: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (16, 16), COLOURS[colour])},
                                         {"type": "text", "text": "What colour is the box?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return generated[0, inputs["input_ids"].shape[1] :].tolist(), processor, model


def test_the_training_run_lowers_the_loss(chat_model):
    _, report = chat_model
    assert report["steps"] == 30
    assert report["train_loss_last"] < 0.5 * report["train_loss_first"]


def test_the_trained_chat_model_stops_at_the_end_of_its_turn(chat_model):
    final, _ = chat_model
    new_tokens, processor, model = generate_answer(final, "red")
    eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in model.generation_config.eos_token_id
    assert new_tokens[-1] == eot, processor.tokenizer.decode(new_tokens)
    assert len(new_tokens) < MAX_NEW_TOKENS // 2, processor.tokenizer.decode(new_tokens)
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert answer.endswith("box."), answer
