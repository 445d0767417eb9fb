"""Data sources: open what the data config names, deal its examples to the readers, and read each reader's share.

Readers. A run reads its data with J = W * K readers: the K loader workers (one reader without workers) of each of
the W ranks. Every example read gets a sample id, stable across runs and resumes (see below), which the pipeline
reports with each batch.

Map-style sources (the embedded scenes set, or anything `datasets` loads without streaming) are not cut into rank
parts. Each epoch has one global order of all N examples: a seeded permutation (`shuffle`) or 0..N-1. A `Deal` gives
reader j = worker * W + rank the order's positions j, j + J, j + 2J, ... So rank r reads the positions r, r + W, ...
whatever K is; unshuffled, rank r reads the rows r, r + W, r + 2W, ... of the data set. A sample's id is its index
in the data set. A reader's position is only (epoch, cursor): how much of its share of the epoch it has read.

Re-dealing (resuming on another layout). Because every reader's share is a known set of positions, the positions
an epoch has consumed so far can be computed from all readers' (epoch, cursor) and what each still buffers (see
`redeal`). The new layout's J' readers then share the epoch's remaining positions in order (the holes below the
old readers' frontier first, then the tail), reader j' taking every J'-th of them, and later epochs are dealt as
usual. A `Deal` keeps, for each partly consumed epoch, the set already taken as the count of leading taken positions
and a zlib-compressed bitmap of the window after it up to the last taken one. The window spans the spread of the
old readers' frontiers and the samples they had buffered, not the epoch: it grows only as that spread does (about
as the square root of the steps), never past N / 8 bytes before compression. Measured on 1M scenes examples: 4
ranks after 400 steps each had cursors 43 apart, and the deal re-dealt to 3 ranks was 142 bytes (a window of 266
positions); 32 readers whose cursors are 600 apart, a much longer run's spread, give 1.2 kB
(tests/test_data_resume.py). A rank's whole state is under 1 kB plus the deal.

Streams (`IterableDataset`) are split across ranks and then workers with `split_dataset_by_node`, which makes
reader rank * K + worker of J; each keeps its position with `IterableDataset.state_dict()`. Its id for the n-th
example it reads in an epoch is reader + n * J: the example's position in the stream when `datasets` splits the
stream example by example (its "examples" strategy: fewer shards than readers, or a count that does not divide),
and a unique, stable stand-in when it deals whole shards. A stream cannot be re-dealt: a reader's position is a
place in its own split of the stream.

Image columns come undecoded, so that decoding happens in the loader's workers, and a broken image is one skipped
sample rather than an exception inside `datasets`.

Files that `datasets` cannot read. Every call into `datasets` that opens or reads files (opening, the first example,
each read) runs inside `health.explain_data_errors`, which raises `DataSourceError` naming the file and the fix
instead of a bare `StopIteration` or "Could not open Parquet input source '<Buffer>'". A stream meets a broken file
only when it gets there, possibly hours into a run; `on_bad_files` (`datasets`' own option, parquet only) then
chooses between stopping ("error", the default) and skipping the file ("warn" logs its name). A skipped file's
examples are never read, so they are not in the skip counts, which are per example.

Webdatasets. `datasets` infers a webdataset's columns from the first samples of its first tar (see
`formats.webdataset_features`); `open_source` names the columns the data config asks for, and reopens the data with
any the inference dropped.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset, Features, Image, IterableDataset, LargeList, List, load_dataset
from datasets.distributed import split_dataset_by_node

from ..scenes import ScenesSource
from .formats import ColumnMap, webdataset_features
from .health import DataSourceError, explain_data_errors


class Example(NamedTuple):
    """One example as a reader yields it: its sample id, a name for messages, the raw example, its epoch, and
    whether it is the first its reader reads in that epoch."""

    id: int
    name: str
    data: Any
    epoch: int
    opens_epoch: bool


def open_source(config, rank: int = 0, world_size: int = 1, image_token: str | None = None):
    """The data named by `config` (a `DataConfig`): for map-style sources the whole of it (a `Deal` shares it out),
    for streams the rank's split."""
    if config.dataset == "scenes":
        options = {} if image_token is None else {"image_token": image_token}
        return ScenesSource(config.split, config.scenes_size, config.seed, **options)
    columns = column_map(config)
    features = webdataset_features(None, columns) if config.dataset == "webdataset" else None
    data = _load(config, features)
    if data.info.builder_name == "webdataset":
        # Columns the first samples lacked. Opening again costs little when streaming; a map-style webdataset is
        # prepared again, once, under the new features.
        features = webdataset_features(data.features, columns)
        if features is not None:
            data = _load(config, features)
    with data_errors(config):
        data = without_image_decoding(data)
    return split_dataset_by_node(data, rank=rank, world_size=world_size) if config.streaming else data


def _load(config, features):
    data_files = config.data_files.split(",") if config.data_files and "," in config.data_files else config.data_files
    options = {} if features is None else {"features": features}
    if config.on_bad_files != "error":
        options["on_bad_files"] = config.on_bad_files
    try:
        with data_errors(config):
            return load_dataset(
                config.dataset,
                name=config.dataset_config,
                data_dir=config.data_dir,
                data_files=data_files,
                split=config.split,
                streaming=config.streaming,
                cache_dir=config.cache_dir,
                **options,
            )
    except DataSourceError as error:
        if "on_bad_files" in options and "on_bad_files" in str(error.__cause__):
            raise ValueError(
                f"on_bad_files={config.on_bad_files!r} needs a `datasets` builder that can skip unreadable files "
                f"(parquet); {config.dataset!r} cannot. Remove the bad files, or set on_bad_files='error'."
            ) from error.__cause__
        raise


def column_map(config, columns=()) -> ColumnMap:
    """The columns `config` names (None: found from `columns`, the data's column names, by `resolved`)."""
    return ColumnMap(
        config.format,
        config.image_column,
        config.text_column,
        config.images_column,
        config.texts_column,
        config.messages_column,
        columns,
    )


class data_errors(explain_data_errors):
    """`explain_data_errors` for the files `config` names; where a parquet file cannot be read and the run stops
    for it (`on_bad_files="error"`), the message also says how to skip such files instead."""

    def __init__(self, config):
        super().__init__(config.dataset, config.data_files, config.data_dir)
        self.on_bad_files = config.on_bad_files

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            return super().__exit__(kind, error, traceback)
        except DataSourceError as explained:
            if self.on_bad_files != "error" or not _unreadable_parquet(error):
                raise
            raise DataSourceError(
                f"{explained}. To skip unreadable files and train on the rest, set on_bad_files='warn' (the data "
                "config's; `datasets` then logs each file it skips)"
            ) from error


def _unreadable_parquet(error: BaseException | None) -> bool:
    """Whether `error`, or one it was raised from or while handling, is pyarrow failing to open a parquet file."""
    seen = []
    while error is not None and error not in seen:
        if type(error).__name__ == "ArrowInvalid" and "parquet" in str(error).lower():
            return True
        seen.append(error)
        error = error.__cause__ or error.__context__
    return False


def is_stream(source) -> bool:
    return isinstance(source, IterableDataset)


def column_names(source, errors=None) -> list[str]:
    """The source's columns; a stream that does not know them is asked for its first example, inside `errors` (a
    `data_errors`) since that reads a file."""
    if isinstance(source, (Dataset, IterableDataset)) and source.column_names is not None:
        return list(source.column_names)
    if isinstance(source, Sequence):
        return list(source[0])
    with errors or contextlib.nullcontext():
        return list(next(iter(source)))


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


# Map-style sources: the deal


def reader_index(rank: int, world_size: int, worker: int) -> int:
    """The map-style reader that worker `worker` of rank `rank` is: rank r's readers are r, r + W, r + 2W, ..."""
    return worker * world_size + rank


class Deal:
    """Which positions of each epoch's global order each of `readers` readers reads.

    `taken` holds, for epochs partly consumed under an earlier layout, a boolean array over positions (True:
    consumed); those epochs deal only their remaining positions. `start` is the epoch a fresh reader begins at.
    """

    def __init__(self, size: int, readers: int, seed: int, shuffle: bool, taken=None, start: int = 0):
        self.size, self.readers, self.seed, self.shuffle = size, readers, seed, shuffle
        self.taken: dict[int, np.ndarray] = dict(taken or {})
        self.start = start
        self._remaining: dict[int, np.ndarray] = {}
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Position -> index in the data set, for `epoch`."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.size) if self.shuffle else np.arange(self.size))
        return self._order[1]

    def share(self, epoch: int, reader: int) -> np.ndarray:
        """The positions `reader` reads in `epoch`, in reading order."""
        if epoch not in self.taken:
            return np.arange(reader, self.size, self.readers)
        if epoch not in self._remaining:
            self._remaining[epoch] = np.flatnonzero(~self.taken[epoch])
        return self._remaining[epoch][reader :: self.readers]

    def reads(self, reader: int, epoch: int, cursor: int, num_epochs: int | None) -> Iterator[tuple[int, int, int]]:
        """(epoch, cursor, position) of every read `reader` makes from (epoch, cursor) on."""
        while num_epochs is None or epoch < num_epochs:
            share = self.share(epoch, reader)
            if len(share) == 0 and epoch not in self.taken:
                return  # more readers than examples: this reader's share of every whole epoch is empty
            for index in range(cursor, len(share)):
                yield epoch, index, int(share[index])
            epoch, cursor = epoch + 1, 0

    def state(self) -> dict:
        return {
            "readers": self.readers,
            "start": self.start,
            "taken": {str(epoch): _encode_bitmap(taken) for epoch, taken in sorted(self.taken.items())},
        }

    @classmethod
    def from_state(cls, state: dict, size: int, seed: int, shuffle: bool) -> Deal:
        taken = {int(epoch): _decode_bitmap(bits, size) for epoch, bits in state["taken"].items()}
        return cls(size, state["readers"], seed, shuffle, taken, state["start"])


class ReaderProgress(NamedTuple):
    """What one reader of a saved layout had consumed: everything of its share before `epoch`/`cursor` (the read
    of its oldest sample still buffered, or its position if none), then, read by read, whether each later read was
    consumed (delivered in a batch or skipped) or is still buffered."""

    reader: int
    epoch: int
    cursor: int
    consumed_after: list[bool]


def redeal(deal: Deal, progress: list[ReaderProgress], readers: int, num_epochs: int | None) -> Deal:
    """A deal of what `deal`'s readers (all of them, one `ReaderProgress` each) have not consumed to `readers` new
    readers: the epochs they had partly consumed deal their remaining positions; the new readers start at the first
    such epoch."""
    consumed_reads: dict[int, list[int]] = defaultdict(list)
    last = max([p.epoch for p in progress] + list(deal.taken))
    for reader, epoch, cursor, consumed_after in progress:
        reads = itertools.islice(deal.reads(reader, epoch, cursor, num_epochs), len(consumed_after))
        for (read_epoch, _, position), consumed in zip(reads, consumed_after):
            last = max(last, read_epoch)
            if consumed:
                consumed_reads[read_epoch].append(position)
    first = min(p.epoch for p in progress)
    end = last + 1 if num_epochs is None else min(last + 1, num_epochs)
    taken, start = {}, None
    for epoch in range(first, end):
        done = deal.taken[epoch].copy() if epoch in deal.taken else np.zeros(deal.size, dtype=bool)
        for p in progress:
            if p.epoch >= epoch:
                share = deal.share(epoch, p.reader)
                done[share if p.epoch > epoch else share[: p.cursor]] = True
        done[consumed_reads[epoch]] = True
        if start is None and not done.all():
            start = epoch
        if start is not None and done.any():
            taken[epoch] = done  # an epoch after `start` may be whole: it must not be dealt again either
    return Deal(deal.size, readers, deal.seed, deal.shuffle, taken, end if start is None else start)


def _encode_bitmap(taken: np.ndarray) -> dict:
    """A taken set as its leading run of taken positions and a compressed bitmap of the window after it."""
    lead = len(taken) if taken.all() else int(np.argmin(taken))
    end = len(taken) - int(np.argmax(taken[::-1])) if taken.any() else 0
    window = taken[lead : max(lead, end)]
    bits = zlib.compress(np.packbits(window).tobytes(), 9)
    return {"lead": lead, "window": len(window), "bits": base64.b64encode(bits).decode("ascii")}


def _decode_bitmap(state: dict, size: int) -> np.ndarray:
    taken = np.zeros(size, dtype=bool)
    lead, window = state["lead"], state["window"]
    taken[:lead] = True
    packed = np.frombuffer(zlib.decompress(base64.b64decode(state["bits"])), dtype=np.uint8)
    taken[lead : lead + window] = np.unpackbits(packed, count=window).astype(bool)
    return taken


# Readers


class MapReader:
    """Reader `reader` of a map-style source under `deal`; its position is (epoch, cursor) in its share. Reads run
    inside `errors` (a `data_errors`), if given."""

    def __init__(self, source, deal: Deal, reader: int, num_epochs: int | None, errors=None):
        self.source, self.deal, self.reader, self.num_epochs = source, deal, reader, num_epochs
        self.errors = errors or contextlib.nullcontext()
        self.epoch, self.cursor = deal.start, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]

    def __iter__(self) -> Iterator[Example]:
        for epoch, cursor, position in self.deal.reads(self.reader, self.epoch, self.cursor, self.num_epochs):
            index = int(self.deal.order(epoch)[position])
            with self.errors:  # a row `datasets` cannot convert (text that is not UTF-8) fails here
                example = self.source[index]
            self.epoch, self.cursor = epoch, cursor + 1
            yield Example(index, f"example {index}", example, epoch, cursor == 0)


class StreamReader:
    """Reader rank * K + worker of a stream: the rank's split, split again by worker (`datasets` composes both).
    Reads run inside `errors` (a `data_errors`), if given: a stream opens each file only when it gets to it."""

    def __init__(
        self,
        source: IterableDataset,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        num_epochs: int | None,
        errors=None,
    ):
        self.stream = split_dataset_by_node(source, worker, num_workers) if num_workers > 1 else source
        self.reader, self.readers = rank * num_workers + worker, world_size * num_workers
        self.num_epochs = num_epochs
        self.errors = errors or contextlib.nullcontext()
        # read: examples read in all epochs; in_epoch: in this one; stream_state: None at the start of an epoch
        self.epoch, self.read, self.in_epoch, self.stream_state = 0, 0, 0, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "in_epoch": self.in_epoch, "stream": self.stream_state}

    def restore(self, state: dict) -> None:
        self.epoch, self.read, self.in_epoch = state["epoch"], state["read"], state["in_epoch"]
        self.stream_state = state["stream"]

    def __iter__(self) -> Iterator[Example]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            self.stream.set_epoch(self.epoch)
            if self.stream_state is not None:
                self.stream.load_state_dict(self.stream_state)
            read_this_epoch = 0
            # `iter(batch_size=1)` rather than `iter(stream)`: inside a loader worker the latter would split the
            # stream across workers a second time.
            batches = self.stream.iter(batch_size=1)
            while True:
                with self.errors:
                    batch = next(batches, None)
                if batch is None:
                    break
                example = {name: values[0] for name, values in batch.items()}
                sample_id, opens_epoch = self.reader + self.in_epoch * self.readers, self.in_epoch == 0
                self.stream_state = self.stream.state_dict()
                self.read, self.in_epoch, read_this_epoch = self.read + 1, self.in_epoch + 1, read_this_epoch + 1
                key = f" (key {example['__key__']!r})" if "__key__" in example else ""
                yield Example(sample_id, f"streamed example {sample_id}{key}", example, self.epoch, opens_epoch)
            if read_this_epoch == 0 and self.stream_state is None:
                return
            self.epoch, self.in_epoch, self.stream_state = self.epoch + 1, 0, None
