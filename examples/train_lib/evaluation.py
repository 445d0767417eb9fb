"""Exact-match evaluation by greedy generation: does the model say the caption, and only because it sees the image?

The prompt is the image placeholder alone; the answer must equal the caption exactly. Run again with every image
replaced by a flat grey one of the same size: a model that reads the image drops to chance there.
"""

from __future__ import annotations

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
