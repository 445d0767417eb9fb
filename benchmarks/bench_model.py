"""The benchmark model (built from config, random weights), its FLOP count, the measured matmul ceiling, and clocks.

Model FLOPs per step (what the step must compute; padding and logits nobody trains on are not counted):
    decoder    6 · N_dec · T_real        N_dec: the decoder layers' matmul weights; T_real: non-pad tokens
    lm_head    6 · V · D · T_target      logits are only needed where a label is
    vision     6 · N_vis · P_real        N_vis: patch embedding + encoder layers; P_real: valid patches
    projector  6 · N_proj · T_image
    attention  6 · layers · D · Σ l²     per sample of l tokens, causal (forward 2·D·l², backward twice that)
             + 12 · layers_v · D_v · Σ n²  per image of n patches, bidirectional
MFU = model FLOPs / step time / the bf16 matmul rate measured on the same device. "MFU 6N" = 6 · all params ·
T_real, the convention behind the issue's baseline figures.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from benchmarks.train_workload import Batch, TokenIds
from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration

TEXT_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               tie_word_embeddings=True)
VISION_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=16, num_patches=256)
TEXT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
VISION_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   patch_size=4, num_patches=64)


def model_config(text: dict, vision: dict, merge: int) -> Llama3Siglip2Config:
    return Llama3Siglip2Config(text_config=dict(text, pad_token_id=TokenIds(text["vocab_size"]).pad),
                               vision_config=vision, spatial_merge_size=merge)


def build_model(config: Llama3Siglip2Config, device: torch.device) -> Llama3Siglip2ForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama3Siglip2ForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.train()


@dataclass(frozen=True)
class FlopCounts:
    decoder_matmul: int
    lm_head: int
    vision_matmul: int
    projector: int
    text_layers: int
    text_width: int
    vision_layers: int
    vision_width: int
    all_params: int

    @classmethod
    def of(cls, model) -> FlopCounts:
        def matmul_weights(module, skip=()):
            return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and not any(s in n for s in skip))
        text, vision = model.config.text_config, model.config.vision_config
        return cls(matmul_weights(model.model.language_model.layers), model.lm_head.weight.numel(),
                   matmul_weights(model.model.vision_tower, skip=("position_embedding",)),
                   matmul_weights(model.model.multi_modal_projector), text.num_hidden_layers, text.hidden_size,
                   vision.num_hidden_layers, vision.hidden_size, sum(p.numel() for p in model.parameters()))

    def model_flops(self, batch: Batch) -> float:
        dense = 6 * (self.decoder_matmul * batch.real_tokens + self.lm_head * batch.target_tokens
                     + self.vision_matmul * sum(batch.image_patches) + self.projector * batch.image_tokens)
        attention = 6 * self.text_layers * self.text_width * sum(l * l for l in batch.sample_lengths)
        attention += 12 * self.vision_layers * self.vision_width * sum(n * n for n in batch.image_patches)
        return dense + attention


class Clock:
    """Timestamps that follow the device's queue: CUDA events there (no sync until read), the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def bf16_matmul_rate(device: torch.device, size: int) -> float:
    """FLOP/s of a large bf16 matmul on random data (median of 10): the ceiling MFU is measured against."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    clock = Clock(device)
    for _ in range(10):
        clock.mark()
        a @ b
    clock.mark()
    return 2 * size**3 / sorted(clock.intervals_s())[4]
