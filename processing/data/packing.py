"""Packing buffer: turns a stream of samples into batches that fill their rows and keep to the image budget.

The collator packs whatever it is given; to fill rows, the batcher must choose what to give it. The buffer holds
about `1 + lookahead` batches' worth of tokens and, for each batch, runs best-fit decreasing over everything it
holds into at most `rows` rows of `seq_len` tokens and at most `max_images` images. Samples that do not fit wait
for the next batch; one that has waited `max_wait` batches goes before all younger ones, so none waits forever.

The buffer only stores keys, lengths, image counts and the batch at which each sample arrived; that is its whole
state, so a pipeline can rebuild it exactly on resume (see `processing.data.stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..collator import pack_samples


@dataclass
class BufferedSample:
    key: int
    length: int
    images: int
    arrived_at: int  # number of batches taken before this sample arrived
    payload: Any = None


class PackingBuffer:
    def __init__(
        self,
        seq_len: int,
        rows: int,
        max_images: int | None = None,
        lookahead: float = 1.0,
        max_wait: int = 4,
    ):
        self.seq_len, self.rows, self.max_images = seq_len, rows, max_images
        self.threshold_tokens = (1 + lookahead) * rows * seq_len
        self.max_wait = max_wait
        self.samples: list[BufferedSample] = []
        self.tokens = 0
        self.batches_taken = 0

    def add(self, key: int, length: int, images: int, payload: Any = None, arrived_at: int | None = None) -> None:
        """Buffer a sample; it must be possible (length <= seq_len, images <= max_images)."""
        if length > self.seq_len or (self.max_images is not None and images > self.max_images):
            raise ValueError(
                f"sample {key} ({length} tokens, {images} images) can never fit a batch of seq_len {self.seq_len} "
                f"and {self.max_images} images; skip it before buffering"
            )
        arrived_at = self.batches_taken if arrived_at is None else arrived_at
        self.samples.append(BufferedSample(key, length, images, arrived_at, payload))
        self.tokens += length

    def __len__(self) -> int:
        return len(self.samples)

    def ready(self) -> bool:
        """Whether the buffer holds enough to choose a well-filled batch from."""
        return self.tokens >= self.threshold_tokens

    def take(self) -> list[list[BufferedSample]]:
        """Remove and return the next batch as rows of samples, each row in arrival order."""
        plan = pack_samples(
            [sample.length for sample in self.samples],
            self.seq_len,
            [sample.images for sample in self.samples],
            max_images=self.max_images,
            max_rows=self.rows,
            priorities=[int(self.batches_taken - sample.arrived_at >= self.max_wait) for sample in self.samples],
        )
        rows = [[self.samples[i] for i in row] for row in plan.rows]
        self.samples = [self.samples[i] for i in plan.unplaced]
        self.tokens = sum(sample.length for sample in self.samples)
        self.batches_taken += 1
        return rows
