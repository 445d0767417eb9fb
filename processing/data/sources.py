"""Data sources: open what the data config names, shard it across ranks, and read each loader worker's share.

`open_source` gives the rank's part of the data: the embedded scenes set, or anything `datasets.load_dataset`
reads (a hub name, parquet, json/jsonl, imagefolder, webdataset tar), local or streaming, split across ranks with
`datasets.distributed.split_dataset_by_node`. Image columns come undecoded, so that decoding happens in the
loader's workers, and a broken image is one skipped sample rather than an exception inside `datasets`.

`make_reader` gives one loader worker's reader. A reader yields `(name, example)`, where `name` says which example
it is for error messages, and has a `state()` that `restore()` takes to go on reading exactly after the last
example yielded. Map-style sources are read in a per-epoch permutation (from the seed), each worker taking every
`num_workers`-th entry; streams are split across workers the same way as across ranks, and keep their position
with `IterableDataset.state_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, Features, Image, IterableDataset, LargeList, List, load_dataset
from datasets.distributed import split_dataset_by_node

from ..scenes import ScenesSource


class RankShard(Sequence):
    """Rank `rank`'s contiguous part of a sequence, cut as `split_dataset_by_node` cuts a map-style data set."""

    def __init__(self, source: Sequence, rank: int, world_size: int):
        size, extra = divmod(len(source), world_size)
        self.source, self.start = source, rank * size + min(rank, extra)
        self.size = size + (rank < extra)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.source[self.start + index]


def open_source(config, rank: int = 0, world_size: int = 1, image_token: str | None = None):
    """The rank's part of the data named by `config` (a `DataConfig`): a sequence or a `datasets` data set."""
    if config.dataset == "scenes":
        options = {} if image_token is None else {"image_token": image_token}
        return RankShard(ScenesSource(config.split, config.scenes_size, config.seed, **options), rank, world_size)
    data_files = config.data_files.split(",") if config.data_files and "," in config.data_files else config.data_files
    data = load_dataset(
        config.dataset,
        name=config.dataset_config,
        data_dir=config.data_dir,
        data_files=data_files,
        split=config.split,
        streaming=config.streaming,
        cache_dir=config.cache_dir,
    )
    return split_dataset_by_node(without_image_decoding(data), rank=rank, world_size=world_size)


def column_names(source) -> list[str]:
    if isinstance(source, (Dataset, IterableDataset)) and source.column_names is not None:
        return list(source.column_names)
    first = source[0] if isinstance(source, Sequence) else next(iter(source))
    return list(first)


def without_image_decoding(data):
    """The same data set with every Image feature left as `{"bytes", "path"}` for the workers to decode."""
    if data.features is None:
        return data
    features = Features({name: _undecoded(feature) for name, feature in data.features.items()})
    return data if features == data.features else data.cast(features)


def _undecoded(feature):
    if isinstance(feature, Image):
        return Image(mode=feature.mode, decode=False)
    if isinstance(feature, List):
        return List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, LargeList):
        return LargeList(_undecoded(feature.feature))
    if isinstance(feature, dict):
        return {name: _undecoded(value) for name, value in feature.items()}
    return feature


def make_reader(source, worker: int, num_workers: int, rank: int, seed: int, shuffle: bool, num_epochs: int | None):
    if isinstance(source, IterableDataset):
        return StreamReader(source, worker, num_workers, rank, num_epochs)
    return MapReader(source, worker, num_workers, rank, seed, shuffle, num_epochs)


class MapReader:
    def __init__(self, source, worker, num_workers, rank, seed, shuffle, num_epochs):
        self.source, self.worker, self.num_workers, self.rank = source, worker, num_workers, rank
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.epoch, self.cursor = 0, 0  # cursor: entries of this worker's share of the epoch already read

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]

    def _share(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.source))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return order[self.worker :: self.num_workers]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            share = self._share(self.epoch)
            if len(share) == 0:
                return
            while self.cursor < len(share):
                index = int(share[self.cursor])
                example = self.source[index]
                self.cursor += 1
                yield f"example {index} of rank {self.rank}'s shard", example
            self.epoch, self.cursor = self.epoch + 1, 0


class StreamReader:
    def __init__(self, source: IterableDataset, worker, num_workers, rank, num_epochs):
        # Splitting again by worker composes with the rank split: worker w of rank r reads share r * W + w.
        self.stream = split_dataset_by_node(source, worker, num_workers) if num_workers > 1 else source
        self.worker, self.rank, self.num_epochs = worker, rank, num_epochs
        self.epoch, self.read, self.stream_state = 0, 0, None  # stream_state: None at the start of an epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "stream": self.stream_state}

    def restore(self, state: dict) -> None:
        self.epoch, self.read, self.stream_state = state["epoch"], state["read"], state["stream"]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            self.stream.set_epoch(self.epoch)
            if self.stream_state is not None:
                self.stream.load_state_dict(self.stream_state)
            read_this_epoch = 0
            # `iter(batch_size=1)` rather than `iter(stream)`: inside a loader worker the latter would split the
            # stream across workers a second time.
            for batch in self.stream.iter(batch_size=1):
                example = {name: values[0] for name, values in batch.items()}
                self.stream_state, self.read = self.stream.state_dict(), self.read + 1
                read_this_epoch += 1
                key = f" (key {example['__key__']!r})" if "__key__" in example else ""
                yield f"streamed example {self.read - 1} of worker {self.worker}, rank {self.rank}{key}", example
            if read_this_epoch == 0 and self.stream_state is None:
                return
            self.epoch, self.stream_state = self.epoch + 1, None
