"""Exact-match evaluation by greedy generation: does the model say the caption, and only because it sees the image?

The prompt is the image placeholder alone; the answer must equal the caption exactly. Run again with every image
replaced by a flat grey one of the same size: a model that reads the image drops to chance there.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from PIL import Image


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


@torch.no_grad()
def caption_exact_match(model, processor, examples, batch_size: int = 32, max_new_tokens: int = 16,
                        blank_images: bool = False) -> tuple[float, list[str]]:
    """Fraction of `examples` ((images, caption) pairs) whose greedy generation equals the caption exactly."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    predictions = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            images = [[blank_like(im) if blank_images else im for im in imgs] for imgs, _ in chunk]
            prompts = [processor.image_token * len(imgs) for imgs, _ in chunk]
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            predictions += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    hits = sum(prediction == caption for prediction, (_, caption) in zip(predictions, examples))
    return hits / max(len(examples), 1), predictions


def final_reload_difference(accelerator, model, final_dir: str, batch) -> float | None:
    """Max |logits| difference between the in-memory model and `final/` reloaded by the Auto classes, on `batch`.

    Every process runs the in-memory forward (sharded models need all of them); the main process reloads
    `final/` on its device and runs it the same way (autocast in the run's mixed precision). None elsewhere.
    """
    from transformers import AutoModelForImageTextToText

    batch = batch.to(accelerator.device)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        in_memory = model(**batch).logits.float()
    model.train()
    if not accelerator.is_main_process:
        return None
    with plain_loading(accelerator):
        reloaded = AutoModelForImageTextToText.from_pretrained(final_dir).to(accelerator.device).eval()
    with torch.no_grad(), accelerator.autocast():
        from_disk = reloaded(**batch).logits.float()
    return float((in_memory - from_disk).abs().max())


@contextmanager
def plain_loading(accelerator):
    """Load a whole, unsharded model even inside a ZeRO-3 run, where transformers would partition it on load."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
