"""Packing collator: whole samples, best-fit into rows, images kept with their tokens.

Packing several samples into one row wastes no compute on padding, but three things must hold for it to be
lossless: no sample is cut (an image split from its tokens cannot be scattered back), no token attends across
samples (the model derives per-sample attention from `position_ids` that restart at 0), and no sample learns to
predict the first token of the next one (the first label of every sample is -100).

Shape letters:
    R  rows in a packed batch
    S  tokens per row (`seq_len`, or the longest row with `pad_to_seq_len=False`)
    T  tokens of one sample
    N  images in the batch, in the order of their tokens (row by row, sample by sample)
    L  patches per image, padded to the longest image of the batch
    D  values per patch (3 * patch_size**2)

A sample is what the processor returns for one example, with or without a leading batch dimension of 1:
`input_ids`, optional `attention_mask` and `labels`, and for its images `pixel_values (n, L, D)`,
`pixel_attention_mask (n, L)` and `spatial_shapes (n, 2)`.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BatchFeature

IGNORE_INDEX = -100

# Why a sample was skipped. The data pipeline adds its own reasons; these are the ones packing can find.
TOO_LONG = "too_long"
TOO_MANY_IMAGES = "too_many_images"
EMPTY_TEXT = "empty_text"
_FIXES = {TOO_LONG: "raise seq_len", TOO_MANY_IMAGES: "raise max_images", EMPTY_TEXT: "these samples have no tokens"}


@dataclass(frozen=True)
class PackingPlan:
    """Where `pack_samples` put each sample: `rows` of sample indices, each row in ascending index order."""

    rows: list[list[int]]
    unplaced: list[int]  # possible samples that did not fit the given rows or image budget
    skipped: dict[int, str]  # impossible samples: index -> reason


def pack_samples(
    lengths: Sequence[int],
    seq_len: int,
    image_counts: Sequence[int] | None = None,
    max_images: int | None = None,
    max_rows: int | None = None,
    priorities: Sequence[int] | None = None,
) -> PackingPlan:
    """Best-fit decreasing: place each sample, longest first, in the open row it leaves the least room in.

    A sample longer than `seq_len` or with more images than `max_images` can never be placed; it is returned in
    `skipped` with its reason. With `max_rows` or `max_images` binding, samples that do not fit are `unplaced`
    (left for a later batch). Samples with a higher priority are placed before any of lower priority, so that a
    packing buffer can keep old samples from waiting forever.
    """
    count = len(lengths)
    image_counts = [0] * count if image_counts is None else image_counts
    priorities = [0] * count if priorities is None else priorities
    skipped: dict[int, str] = {}
    candidates = []
    for index in range(count):
        if lengths[index] < 1:
            raise ValueError(f"sample {index} has {lengths[index]} tokens; every sample needs at least one")
        if lengths[index] > seq_len:
            skipped[index] = TOO_LONG
        elif max_images is not None and image_counts[index] > max_images:
            skipped[index] = TOO_MANY_IMAGES
        else:
            candidates.append(index)
    candidates.sort(key=lambda i: (-priorities[i], -lengths[i], i))

    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted so bisect finds the tightest fit
    images_left = float("inf") if max_images is None else max_images
    unplaced = []
    for index in candidates:
        if image_counts[index] > images_left:
            unplaced.append(index)
            continue
        tightest = bisect_left(open_rows, (lengths[index], -1))
        if tightest < len(open_rows):
            room, row = open_rows.pop(tightest)
        elif max_rows is None or len(rows) < max_rows:
            room, row = seq_len, len(rows)
            rows.append([])
        else:
            unplaced.append(index)
            continue
        rows[row].append(index)
        images_left -= image_counts[index]
        if room - lengths[index] > 0:
            insort(open_rows, (room - lengths[index], row))
    rows = sorted((sorted(row) for row in rows), key=lambda row: row[0])
    return PackingPlan(rows=rows, unplaced=sorted(unplaced), skipped=skipped)


@dataclass(frozen=True)
class PackingStats:
    """How full one packed batch is: efficiency = real tokens / (R * S); image-slot use = N / max_images."""

    rows: int
    seq_len: int
    samples: int
    real_tokens: int
    images: int
    max_images: int | None

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(1, self.rows * self.seq_len)

    @property
    def image_slot_use(self) -> float | None:
        return None if not self.max_images else self.images / self.max_images


@dataclass
class PackedSample:
    """One sample reduced to what packing needs; `index` names it in error messages."""

    index: int
    input_ids_T: torch.Tensor
    labels_T: torch.Tensor
    pixel_values_nLD: torch.Tensor | None
    pixel_attention_mask_nL: torch.Tensor | None
    spatial_shapes_n2: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.input_ids_T.shape[0]

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values_nLD is None else self.pixel_values_nLD.shape[0]


def _tokens(value, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ValueError(f"sample {index}: {name} has shape {tuple(tensor.shape)}; expected (T,) or (1, T)")
    return tensor.long()


def to_packed_sample(sample: Mapping, index: int, ignore_token_ids: Sequence[int] = ()) -> PackedSample:
    """Check one processor output and strip it to 1-D tokens and its image tensors.

    Without `labels`, every token is a target except those in `ignore_token_ids` (image, boi, eoi, pad).
    """
    input_ids = _tokens(sample["input_ids"], "input_ids", index)
    if sample.get("labels") is not None:
        labels = _tokens(sample["labels"], "labels", index)
    else:
        never_targets = torch.isin(input_ids, torch.tensor(list(ignore_token_ids), dtype=torch.long))
        labels = input_ids.masked_fill(never_targets, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"sample {index}: labels have {labels.shape[0]} tokens but input_ids {input_ids.shape[0]}")
    if sample.get("attention_mask") is not None:
        # A processor may have padded the example; the padding is not part of the sample.
        keep = _tokens(sample["attention_mask"], "attention_mask", index).bool()
        input_ids, labels = input_ids[keep], labels[keep]

    pixel_values = sample.get("pixel_values")
    if pixel_values is None or len(pixel_values) == 0:
        return PackedSample(index, input_ids, labels, None, None, None)
    pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.dim() == 4 and pixel_values.shape[0] == 1:
        pixel_values = pixel_values[0]
    mask = torch.as_tensor(sample["pixel_attention_mask"]).reshape(pixel_values.shape[:2])
    spatial_shapes = torch.as_tensor(sample["spatial_shapes"]).reshape(-1, 2)
    if pixel_values.dim() != 3 or spatial_shapes.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"sample {index}: pixel_values {tuple(pixel_values.shape)} and spatial_shapes "
            f"{tuple(spatial_shapes.shape)} do not describe the same (n, L, D) images"
        )
    if not mask.bool().any(dim=1).all():
        raise ValueError(f"sample {index}: an image has no valid patch in pixel_attention_mask")
    return PackedSample(index, input_ids, labels, pixel_values, mask, spatial_shapes)


class MultimodalPackingCollator:
    """`collator(samples) -> BatchFeature` of packed rows; impossible samples are dropped, said and counted.

    Returns `input_ids`, `labels` and `position_ids` of shape (R, S) and, when the batch has images,
    `pixel_values (N, L, D)`, `pixel_attention_mask (N, L)` and `spatial_shapes (N, 2)`. There is no
    `attention_mask`: the model isolates samples by the restarting `position_ids`.

    A sample longer than `seq_len` or with more images than `max_images` is dropped, with a warning the first time
    for each reason, and counted in `skipped` (reason -> samples, over the collator's life); with `truncation=True`
    it is cut instead, before the first image that would not fit whole (an image cut from its tokens could not be
    scattered back), and counted in `truncated`. A batch whose samples are all dropped raises, naming them: the model
    cannot take an empty batch. `last_stats` describes the last batch.

    Given samples that are each possible but together carry more than `max_images` images, it raises: forming
    batches within the image budget is the batcher's job (see `processing.data`), and dropping samples here
    would lose them silently.
    """

    def __init__(
        self,
        seq_len: int,
        pad_token_id: int,
        max_images: int | None = None,
        ignore_token_ids: Sequence[int] = (),
        pad_to_seq_len: bool = True,
        truncation: bool = False,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len = seq_len
        self.pad_token_id = pad_token_id
        self.max_images = max_images
        self.ignore_token_ids = tuple(ignore_token_ids)
        self.pad_to_seq_len = pad_to_seq_len
        self.truncation = truncation
        self.boi_token_id, self.eoi_token_id = boi_token_id, eoi_token_id  # where truncation finds images
        self.skipped: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self.last_stats: PackingStats | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_processor(cls, processor, seq_len: int, max_images: int | None = None, **kwargs):
        """Take the pad id, the ids that are never targets (image, boi, eoi, pad) and the image delimiters from the
        processor."""
        never_targets = (
            processor.image_token_id,
            processor.boi_token_id,
            processor.eoi_token_id,
            processor.pad_token_id,
        )
        kwargs = {"boi_token_id": processor.boi_token_id, "eoi_token_id": processor.eoi_token_id, **kwargs}
        return cls(seq_len, processor.pad_token_id, max_images, ignore_token_ids=never_targets, **kwargs)

    def __call__(self, samples: Sequence[Mapping]) -> BatchFeature:
        possible, dropped = [], []  # dropped: (sample index, reason, what is wrong)
        for index, sample in enumerate(samples):
            packed_sample = to_packed_sample(sample, index, self.ignore_token_ids)
            if packed_sample.length == 0:
                dropped.append((index, EMPTY_TEXT, "no tokens"))
                continue
            if self.truncation:
                cut = self._truncated(packed_sample)
                if cut is None:
                    reason = self._reason(packed_sample)
                    what = f"{self._what_is_wrong(packed_sample, reason)}; cut to fit, it has nothing to learn from"
                    dropped.append((index, reason, what))
                    continue
                packed_sample = cut
            possible.append(packed_sample)
        plan = pack_samples(
            [s.length for s in possible], self.seq_len, [s.num_images for s in possible], self.max_images
        )
        for i, reason in plan.skipped.items():
            dropped.append((possible[i].index, reason, self._what_is_wrong(possible[i], reason)))
        self._account(sorted(dropped), len(samples))
        kept = [s for i, s in enumerate(possible) if i not in plan.skipped]
        images = sum(s.num_images for s in kept)
        if self.max_images is not None and images > self.max_images:
            raise ValueError(
                f"samples {[s.index for s in kept]} carry {images} images together, over the batch budget of "
                f"{self.max_images}; form batches within the budget before collating"
            )
        return self.collate_rows([[possible[i] for i in row] for row in plan.rows])

    def _reason(self, sample: PackedSample) -> str:
        return TOO_LONG if sample.length > self.seq_len else TOO_MANY_IMAGES

    def _what_is_wrong(self, sample: PackedSample, reason: str) -> str:
        if reason == TOO_LONG:
            return f"{sample.length} tokens, over seq_len {self.seq_len}"
        return f"{sample.num_images} images, over max_images {self.max_images}"

    def _account(self, dropped: list[tuple[int, str, str]], batch_size: int) -> None:
        """Count the dropped samples; warn the first time for each reason; refuse a batch left empty."""
        reasons = Counter(reason for _, reason, _ in dropped)
        self.skipped.update(reasons)
        if dropped and len(dropped) == batch_size or not batch_size:
            listed = "; ".join(f"sample {index}: {what}" for index, _, what in dropped[:8])
            raise ValueError(
                f"no sample of the batch can be packed ({listed or 'the batch is empty'}), and the model cannot take "
                "an empty batch: raise seq_len (or max_images), pass truncation=True to cut long samples, or filter "
                "such samples out of the data set"
            )
        for reason, count in reasons.items():
            if reason not in self._warned:
                self._warned.add(reason)
                examples = "; ".join(f"sample {index}: {what}" for index, r, what in dropped if r == reason)
                fix = _FIXES[reason]
                if reason != EMPTY_TEXT and not self.truncation:
                    fix += ", or pass truncation=True to cut such samples"
                warnings.warn(
                    f"MultimodalPackingCollator dropped {count} of {batch_size} samples of a batch as {reason} "
                    f"({examples}); {fix}. Later drops are only counted, in `collator.skipped`.",
                    stacklevel=3,
                )

    def _truncated(self, sample: PackedSample) -> PackedSample | None:
        """`sample` cut to `seq_len` tokens and `max_images` images, never inside an image's tokens; None when the
        cut would leave nothing to learn from (no target after the first token, which is never one)."""
        spans = self._image_spans(sample)
        cut = min(sample.length, self.seq_len)
        if self.max_images is not None and len(spans) > self.max_images:
            cut = min(cut, spans[self.max_images][0])
        images = sum(end <= cut for _, end in spans)
        if images < len(spans):
            cut = min(cut, spans[images][0])  # before the first image that does not fit whole
        if cut == sample.length:
            return sample
        labels = sample.labels_T[:cut]
        if not (labels[1:] != IGNORE_INDEX).any():
            return None
        reason = self._reason(sample)
        self.truncated[reason] += 1
        if f"truncated {reason}" not in self._warned:
            self._warned.add(f"truncated {reason}")
            warnings.warn(
                f"MultimodalPackingCollator truncated sample {sample.index} ({self._what_is_wrong(sample, reason)}) "
                f"to {cut} tokens and {images} images; later truncations are only counted, in `collator.truncated`.",
                stacklevel=3,
            )
        if not images:
            return PackedSample(sample.index, sample.input_ids_T[:cut], labels, None, None, None)
        pixels = (sample.pixel_values_nLD, sample.pixel_attention_mask_nL, sample.spatial_shapes_n2)
        return PackedSample(sample.index, sample.input_ids_T[:cut], labels, *(t[:images] for t in pixels))

    def _image_spans(self, sample: PackedSample) -> list[tuple[int, int]]:
        """(start, end) of each image's tokens, begin-of-image to end-of-image inclusive, in order."""
        if not sample.num_images:
            return []
        if self.boi_token_id is None or self.eoi_token_id is None:
            raise ValueError(
                "truncation of samples with images needs boi_token_id and eoi_token_id, to cut only between images; "
                "build the collator with MultimodalPackingCollator.from_processor"
            )
        starts = (sample.input_ids_T == self.boi_token_id).nonzero()[:, 0].tolist()
        ends = (sample.input_ids_T == self.eoi_token_id).nonzero()[:, 0].tolist()
        if not len(starts) == len(ends) == sample.num_images or any(s >= e for s, e in zip(starts, ends)):
            raise ValueError(
                f"sample {sample.index}: {sample.num_images} images but {len(starts)} begin-of-image and {len(ends)} "
                "end-of-image tokens in order; cannot tell where its images' tokens are to truncate it"
            )
        return [(start, end + 1) for start, end in zip(starts, ends)]

    def collate_rows(self, rows: Sequence[Sequence[PackedSample]]) -> BatchFeature:
        """Lay out rows that are already packed, each sample whole and in the given order."""
        R = len(rows)
        lengths = [sum(s.length for s in row) for row in rows]
        for row, length in zip(rows, lengths):
            if length > self.seq_len:
                names = [s.index for s in row]
                raise ValueError(f"samples {names} fill {length} tokens, over seq_len {self.seq_len}")
        S = self.seq_len if self.pad_to_seq_len else max(lengths, default=0)
        input_ids_RS = torch.full((R, S), self.pad_token_id, dtype=torch.long)
        labels_RS = torch.full((R, S), IGNORE_INDEX, dtype=torch.long)
        position_ids_RS = torch.zeros((R, S), dtype=torch.long)
        images = []
        for r, row in enumerate(rows):
            start = 0
            for sample in row:
                end = start + sample.length
                input_ids_RS[r, start:end] = sample.input_ids_T
                labels_RS[r, start:end] = sample.labels_T
                labels_RS[r, start] = IGNORE_INDEX  # nothing predicts the first token of a sample
                position_ids_RS[r, start:end] = torch.arange(sample.length)
                if sample.num_images:
                    images.append(sample)
                start = end
            # The padding is a sequence of its own, so it restarts positions too and attends to no sample.
            position_ids_RS[r, start:] = torch.arange(S - start)

        batch = {"input_ids": input_ids_RS, "labels": labels_RS, "position_ids": position_ids_RS}
        if images:
            batch.update(_concatenate_images(images))
        self.last_stats = PackingStats(
            rows=R,
            seq_len=S,
            samples=sum(len(row) for row in rows),
            real_tokens=sum(lengths),
            images=sum(s.num_images for s in images),
            max_images=self.max_images,
        )
        return BatchFeature(batch)


def _concatenate_images(samples: Sequence[PackedSample]) -> dict[str, torch.Tensor]:
    """Stack the images of `samples` in order, padding L to the longest valid image of the batch."""
    # Patches past the last valid one are padding in every image, so cutting them changes no valid output.
    L = max(int(s.pixel_attention_mask_nL.nonzero()[:, 1].max()) + 1 for s in samples)
    N = sum(s.num_images for s in samples)
    D = samples[0].pixel_values_nLD.shape[2]
    # numpy, not torch.zeros: a multi-threaded fill of a fresh tensor costs milliseconds per batch when the
    # training process's threads compete for the same cores, and this runs once per batch on the hot path.
    pixel_values_NLD = np.zeros((N, L, D), dtype=np.float32)
    mask_NL = np.zeros((N, L), dtype=np.int32)
    n = 0
    for sample in samples:
        if sample.pixel_values_nLD.shape[2] != D:
            raise ValueError(f"sample {sample.index}: {sample.pixel_values_nLD.shape[2]} values per patch, not {D}")
        count, width = sample.num_images, min(L, sample.pixel_values_nLD.shape[1])
        pixel_values_NLD[n : n + count, :width] = sample.pixel_values_nLD[:, :width].numpy()
        mask_NL[n : n + count, :width] = sample.pixel_attention_mask_nL[:, :width].numpy()
        n += count
    return {
        "pixel_values": torch.from_numpy(pixel_values_NLD),
        "pixel_attention_mask": torch.from_numpy(mask_NL),
        "spatial_shapes": torch.cat([s.spatial_shapes_n2 for s in samples]).long(),
    }
