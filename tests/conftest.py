"""Shared fixtures: tiny Llama and SigLIP2 checkpoints saved locally by transformers, never downloaded.

The checkpoints go through the real loading code (`from_pretrained_components`), so tests exercise what users run.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from processing.tokenizer import build_byte_level_bpe_tokenizer

TOKENIZER_CORPUS = [
    "a red box and a blue box",
    "a green box and a yellow box",
    "a purple box and an orange box",
    "a white box and a black box",
    "Describe the image. What colour is the box on the left?",
    "user assistant system hello world the quick brown fox jumps over the lazy dog",
]

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=4,
    num_patches=64,
)


def tiny_text_config(vocab_size: int, **overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, **{**TINY_TEXT, **overrides})


def tiny_vision_config(**overrides) -> Siglip2VisionConfig:
    return Siglip2VisionConfig(**{**TINY_VISION, **overrides})


@pytest.fixture(scope="session")
def text_tokenizer():
    """A tokenizer like a Llama checkpoint's: Llama 3 special tokens, no image tokens."""
    return build_byte_level_bpe_tokenizer(TOKENIZER_CORPUS, vocab_size=300, with_image_tokens=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, text_tokenizer):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_text_config(len(text_tokenizer), bos_token_id=text_tokenizer.bos_token_id,
                              eos_token_id=text_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    text_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_siglip2_dir(tmp_path_factory):
    """A vision-only SigLIP2 checkpoint."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-siglip2-vision")
    Siglip2VisionModel(tiny_vision_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_siglip2_full_dir(tmp_path_factory):
    """A full SigLIP2 (text + vision) checkpoint, as the hub's siglip2-*-naflex repos are."""
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("tiny-siglip2-full")
    config = Siglip2Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=TINY_VISION,
    )
    Siglip2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def built(tiny_llama_dir, tiny_siglip2_dir):
    """(model, processor) from the tiny checkpoints, merge 1, fp32, eval mode."""
    from modeling_llama3_siglip2 import from_pretrained_components

    model, processor = from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_dir), max_patches=64)
    return model.eval(), processor


@pytest.fixture(scope="session")
def built_merge2(tiny_llama_dir, tiny_siglip2_dir):
    from modeling_llama3_siglip2 import from_pretrained_components

    model, processor = from_pretrained_components(
        str(tiny_llama_dir), str(tiny_siglip2_dir), spatial_merge_size=2, max_patches=64
    )
    return model.eval(), processor


@contextlib.contextmanager
def fresh_accelerate_state():
    """accelerate's process-wide state (`AcceleratorState`, `GradientState`) reset before and after: an Accelerator
    made inside starts from its own arguments, not an earlier test's."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    try:
        yield
    finally:
        reset()
