"""A synthetic caption-like workload for `bench_train.py`: samples, padded batches and packed batches.

A sample is what the processor would return for one captioned image: bos, boi, the image tokens, eoi, the caption
and eos, with only the caption and eos as targets, and the image as ready NaFlex patches of random values (the GPU
time goes to training, not to decoding). Each batch carries the counts that the FLOP formula and the rates need.

Shape letters: B rows, S tokens per row, N images, L patches per (padded) image, P values per patch (3·p·p).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from modeling_llama3_siglip2 import Llama3Siglip2Config
from processing.collator import IGNORE_INDEX, MultimodalPackingCollator, pack_samples


@dataclass(frozen=True)
class Workload:
    min_patches: int = 64
    max_patches: int = 256
    min_caption: int = 8
    max_caption: int = 80
    batch_size: int = 32  # samples per padded batch
    seq_len: int = 4096
    rows: int = 2  # packed rows per batch
    long_seq_len: int = 8192


TINY_WORKLOAD = Workload(16, 64, 4, 20, batch_size=8, seq_len=256, rows=2, long_seq_len=512)
# Images that vary as real ones do (a NaFlex budget of 1024 patches: 64 to 1024 per image, any aspect ratio), so the
# padded patch length L and the image count N both change every batch: the case for bounding compiled graphs.
WORKLOADS = {
    "caption": (Workload(), TINY_WORKLOAD),
    "varied": (Workload(min_patches=64, max_patches=1024, batch_size=16),
               Workload(16, 256, 4, 20, batch_size=8, seq_len=512, rows=2, long_seq_len=1024)),
}


@dataclass(frozen=True)
class TokenIds:
    """Ids at the top of the vocabulary, below the config's image, boi and eoi (the last three)."""

    vocab_size: int

    @property
    def bos(self): return self.vocab_size - 6  # noqa: E704

    @property
    def eos(self): return self.vocab_size - 5  # noqa: E704

    @property
    def pad(self): return self.vocab_size - 4  # noqa: E704


def image_grid(rng: random.Random, workload: Workload, merge: int) -> tuple[int, int]:
    """(h, w) in patches: a count in the workload's range, an aspect ratio in [1/4, 4], sides multiples of `merge`."""
    while True:
        patches = rng.randint(workload.min_patches, workload.max_patches)
        aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
        h = max(merge, round(math.sqrt(patches * aspect) / merge) * merge)
        w = max(merge, patches // h // merge * merge)
        if workload.min_patches <= h * w <= workload.max_patches:
            return h, w


def make_samples(count: int, workload: Workload, config: Llama3Siglip2Config, seed: int) -> list[dict]:
    """Processor-like samples: bos, boi, image tokens, eoi, caption, eos; only the caption and eos are targets."""
    rng, ids, merge = random.Random(seed), TokenIds(config.text_config.vocab_size), config.spatial_merge_size
    P = 3 * config.vision_config.patch_size ** 2
    bank = torch.rand(8, workload.max_patches, P, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    samples = []
    for index in range(count):
        h, w = image_grid(rng, workload, merge)
        image = [ids.bos, config.boi_token_id] + [config.image_token_id] * ((h // merge) * (w // merge))
        image.append(config.eoi_token_id)
        caption = [rng.randrange(ids.bos) for _ in range(rng.randint(workload.min_caption, workload.max_caption))]
        input_ids = torch.tensor(image + caption + [ids.eos])
        labels = input_ids.clone()
        labels[: len(image)] = IGNORE_INDEX
        samples.append(dict(input_ids=input_ids, labels=labels, pixel_values=bank[index % len(bank), : h * w][None],
                            pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long),
                            spatial_shapes=torch.tensor([[h, w]])))
    return samples


@dataclass
class Batch:
    tensors: dict
    tokens: int  # decoder positions, padding included
    real_tokens: int
    target_tokens: int
    sample_lengths: list
    image_patches: list  # h·w of each image
    image_tokens: int

    @property
    def padded_patches(self) -> int:
        """N · L: the patches the encoder computes, padding included."""
        pixels = self.tensors.get("pixel_values")
        return 0 if pixels is None else pixels.shape[0] * pixels.shape[1]


def describe(tensors: dict, samples: list[dict], tokens: int, merge: int) -> Batch:
    shapes = tensors["spatial_shapes"].tolist()
    lengths = [len(s["input_ids"]) for s in samples]
    return Batch(tensors, tokens, sum(lengths), int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum()), lengths,
                 [h * w for h, w in shapes], sum((h // merge) * (w // merge) for h, w in shapes))


def padded_batch(samples: list[dict], pad_id: int, merge: int) -> Batch:
    """What a TRL-style VLM collator gives: text right-padded to the longest sample with an attention mask."""
    B, S = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, S), pad_id)
    labels = torch.full((B, S), IGNORE_INDEX)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = sample["input_ids"], sample["labels"], 1
    L = max(s["pixel_values"].shape[1] for s in samples)
    pixel_values = torch.zeros(B, L, samples[0]["pixel_values"].shape[2])
    pixel_attention_mask = torch.zeros(B, L, dtype=torch.long)
    for n, sample in enumerate(samples):
        patches = sample["pixel_values"].shape[1]
        pixel_values[n, :patches], pixel_attention_mask[n, :patches] = sample["pixel_values"][0], 1
    tensors = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, pixel_values=pixel_values,
                   pixel_attention_mask=pixel_attention_mask,
                   spatial_shapes=torch.cat([s["spatial_shapes"] for s in samples]))
    return describe(tensors, samples, B * S, merge)


def packed_batches(stream, collator: MultimodalPackingCollator, rows: int, count: int, merge: int) -> list[Batch]:
    """Batches of exactly `rows` full rows from our collator; samples that do not fit wait for the next batch."""
    batches, pending = [], []
    for _ in range(count):
        while sum(len(s["input_ids"]) for s in pending) < 1.5 * rows * collator.seq_len:
            pending.append(next(stream))
        plan = pack_samples([len(s["input_ids"]) for s in pending], collator.seq_len, max_rows=rows)
        placed = sorted(i for row in plan.rows for i in row)
        chosen = [pending[i] for i in placed]
        tensors = dict(collator(chosen))
        if tensors["input_ids"].shape[0] != rows:
            raise RuntimeError(f"the collator made {tensors['input_ids'].shape[0]} rows of samples planned in {rows}")
        batches.append(describe(tensors, chosen, rows * collator.seq_len, merge))
        placed_set = set(placed)
        pending = [s for i, s in enumerate(pending) if i not in placed_set]
    return batches


def bucket_patch_length(batch: Batch, multiple: int) -> Batch:
    """Pad the batch's patch length L up to a multiple of `multiple` (masked patches, which change no valid output),
    so that static encoder graphs see a few lengths instead of one per batch."""
    pixels, mask = batch.tensors.get("pixel_values"), batch.tensors.get("pixel_attention_mask")
    if pixels is None or pixels.shape[1] % multiple == 0:
        return batch
    extra = -pixels.shape[1] % multiple
    tensors = dict(batch.tensors, pixel_values=torch.nn.functional.pad(pixels, (0, 0, 0, extra)),
                   pixel_attention_mask=torch.nn.functional.pad(mask, (0, extra)))
    return Batch(tensors, batch.tokens, batch.real_tokens, batch.target_tokens, batch.sample_lengths,
                 batch.image_patches, batch.image_tokens)
