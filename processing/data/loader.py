"""The training data pipeline: raw examples to packed batches, in loader workers, with exact resume.

For the trainer:

    loader = build_train_dataloader(DataConfig(...), processor, seq_len, rank, world_size)
    for batch in loader:            # BatchFeature: input_ids, labels, position_ids (R, S) and the image tensors
        loader.last_stats           # PackingStats of that batch: efficiency, image-slot use
        loader.skipped              # Counter: reason -> examples skipped so far, all workers together
    state = loader.state_dict()     # JSON-serialisable; includes buffers' contents (by position) and skip counts
    loader = build_train_dataloader(...); loader.load_state_dict(state)   # the next batches are those that
                                                                           # an uninterrupted run would give

How it works. Each loader worker (`stream.PackedBatchStream`) reads its share of the rank's data (see `sources`),
turns each example into a sample (`formats.SampleMaker`: decode, process, check), buffers samples in a
`PackingBuffer` and, whenever the buffer holds enough, packs one batch of `rows_per_batch` rows within the image
budget and collates it there. A bad example is skipped and counted by reason (`strict=True` raises instead).

Exact resume without storing pixels. A worker's state holds the reader position just before the oldest sample
still buffered, which of the examples read since then are still buffered (and when each arrived), and the skip
counts. Restoring re-reads from that position and processes again only the buffered examples, so the buffer is
rebuilt exactly and the state stays a few hundred bytes. torchdata's `StatefulDataLoader` keeps each worker's state
in step with the batches the trainer has actually received, including those prefetched.

Shape letters: R rows per batch, S tokens per row (seq_len); see `collator` for the image tensors.
"""

from __future__ import annotations

import warnings
from collections import Counter

from torchdata.stateful_dataloader import StatefulDataLoader

from ..collator import PackingStats
from .config import DataConfig
from .stream import PackedBatchStream


def build_train_dataloader(
    config: DataConfig, processor, seq_len: int, rank: int = 0, world_size: int = 1
) -> PackedDataLoader:
    """The rank's training batches: rows of `seq_len` tokens, `config.rows_per_batch` rows per batch."""
    return PackedDataLoader(PackedBatchStream(config, processor, seq_len, rank, world_size), config)


def _as_is(item):
    # The workers collate; the loader must not convert what they send.
    return item


class PackedDataLoader:
    """Iterates over packed `BatchFeature`s; counts skips; saves and restores its position exactly.

    `skipped` (reason -> count) and `samples_seen` cover every batch received so far, across workers and
    resumes. Restoring needs the same data config, seq_len, rank, world size and `num_workers`: each worker's
    position and buffer belong to its own share of the data, so they cannot be re-sharded.
    """

    def __init__(self, stream: PackedBatchStream, config: DataConfig):
        self.stream, self.config = stream, config
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on torch >= 2.10
            self.loader = StatefulDataLoader(
                stream,
                batch_size=None,
                num_workers=config.num_workers,
                collate_fn=_as_is,
                prefetch_factor=config.prefetch_factor if config.num_workers else None,
            )
        self._skipped_by_worker: dict[str, dict[str, int]] = {}
        self.samples_seen = 0
        self.last_stats: PackingStats | None = None

    @property
    def skipped(self) -> Counter:
        total: Counter[str] = Counter()
        for counts in self._skipped_by_worker.values():
            total.update(counts)
        return total

    def __iter__(self):
        for batch, report in self.loader:
            self._skipped_by_worker[str(report["worker"])] = report["skipped"]
            if batch is None:
                continue
            self.last_stats = PackingStats(**report["stats"])
            self.samples_seen += self.last_stats.samples
            yield batch

    def _layout(self) -> dict:
        """What the saved positions depend on."""
        config = self.config
        return {
            "num_workers": config.num_workers,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "seq_len": self.stream.seq_len,
            "rows_per_batch": config.rows_per_batch,
            "max_images_per_batch": config.max_images_per_batch,
            "dataset": config.dataset,
            "data_files": config.data_files,
            "split": config.split,
            "streaming": config.streaming,
            "seed": config.seed,
            "shuffle": config.shuffle,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable: the loader's and every worker's position, buffers by position, and skip counts."""
        return {
            "layout": self._layout(),
            "loader": self.loader.state_dict(),
            "skipped_by_worker": {worker: dict(counts) for worker, counts in self._skipped_by_worker.items()},
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        saved, current = state["layout"], self._layout()
        changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if changed:
            details = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume the data pipeline: {details}. Each worker's position and packing buffer belong to "
                "its share of the data; resume with the settings the checkpoint was saved with."
            )
        self.loader.load_state_dict(state["loader"])
        self._skipped_by_worker = {worker: dict(counts) for worker, counts in state["skipped_by_worker"].items()}
        self.samples_seen = state["samples_seen"]
