"""The training data pipeline: raw examples to packed batches, in loader workers, with exact resume.

For the trainer:

    loader = build_train_dataloader(DataConfig(...), processor, seq_len, rank, world_size)
    for batch in loader:            # BatchFeature: input_ids, labels, position_ids (R, S) and the image tensors
        loader.last_sample_ids      # list[int]: the sample ids packed into that batch, row by row (see `sources`)
        loader.last_stats           # PackingStats of that batch: efficiency, image-slot use
        loader.skipped              # Counter: reason -> examples skipped so far, all workers together
        loader.skip_examples        # reason -> the first skipped example of that reason: "example 17: invalid_image: ..."
    state = loader.state_dict()     # JSON-serialisable; includes buffers' contents (by position) and skip counts
    states = gather_object([state]) # every rank's state, in rank order: what a checkpoint keeps
    loader = build_train_dataloader(...); loader.load_state_dicts(states)

`load_state_dicts` takes all ranks' states. On the layout they were saved with (world size and `num_workers`) it
restores this rank's state exactly: the next batches are those an uninterrupted run would give
(`load_state_dict(states[rank])` does the same for one state). On another layout, map-style data is re-dealt: the
epoch's positions that no rank has consumed yet (samples buffered at save time included) are shared by the new
readers, so within the epoch no sample is seen twice and none is missed (see `sources`). Skip counts, skip examples
and `samples_seen` of the old ranks all go to the new rank 0, so that sums over ranks stay right. A stream cannot
be re-dealt; resuming it on another layout raises.

How it works. Each loader worker (`stream.PackedBatchStream`) reads its share of the data (see `sources`),
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
from .sources import Deal, reader_index, redeal
from .stream import PackedBatchStream, describe_data, reader_progress

SHARDING = "global-order"  # how map-style data is dealt (see `sources`); states of another sharding cannot resume
LAYOUT_KEYS = ("rank", "world_size", "num_workers")  # what re-dealing may change


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

    `skipped` (reason -> count), `skip_examples` and `samples_seen` cover every batch received so far, across
    workers and resumes.
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
                pin_memory=config.pin_memory,
            )
        self._skipped_by_worker: dict[str, dict[str, int]] = {}
        self.skip_examples: dict[str, str] = {}
        self.samples_seen = 0
        self.last_stats: PackingStats | None = None
        self.last_sample_ids: list[int] = []

    @property
    def skipped(self) -> Counter:
        total: Counter[str] = Counter()
        for counts in self._skipped_by_worker.values():
            total.update(counts)
        return total

    def __iter__(self):
        for batch, report in self.loader:
            self._skipped_by_worker[str(report["worker"])] = report["skipped"]
            for reason, description in report["skip_examples"].items():
                self.skip_examples.setdefault(reason, description)
            if batch is None:
                continue
            self.last_stats = PackingStats(**report["stats"])
            self.last_sample_ids = report["sample_ids"]
            self.samples_seen += self.last_stats.samples
            yield batch

    def _layout(self) -> dict:
        """What the saved positions depend on. Settings that change only which examples are skipped (image_root,
        allow_paths_outside_image_root, max_image_bytes, strict) or which unreadable files a stream passes over
        (on_bad_files) are left out: a resume may change them, e.g. to skip the broken shard that stopped a run.
        A map-style data set that lost a file has another size, which is checked."""
        config, stream = self.config, self.stream
        return {
            "num_workers": config.num_workers,
            "rank": stream.rank,
            "world_size": stream.world_size,
            "seq_len": stream.seq_len,
            "rows_per_batch": config.rows_per_batch,
            "max_images_per_batch": config.max_images_per_batch,
            "dataset": config.dataset,
            "data_files": config.data_files,
            "split": config.split,
            "streaming": config.streaming,
            "seed": config.seed,
            "shuffle": config.shuffle,
            "size": None if stream.deal is None else stream.deal.size,
            "sharding": SHARDING,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable: the loader's and every worker's position, buffers by position, and skip counts."""
        return {
            "layout": self._layout(),
            "deal": None if self.stream.deal is None else self.stream.deal.state(),
            "loader": self.loader.state_dict(),
            "skipped_by_worker": {worker: dict(counts) for worker, counts in self._skipped_by_worker.items()},
            "skip_examples": dict(self.skip_examples),
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's state, saved on the same layout; see `load_state_dicts` for another layout."""
        changed = self._changes(state["layout"])
        if changed:
            hint = (
                " To resume on another number of ranks or workers, pass every rank's state to load_state_dicts."
                if set(changed) <= set(LAYOUT_KEYS)
                else ""
            )
            raise ValueError(
                f"cannot resume the data pipeline: {_describe(changed)}. Each worker's position and packing buffer "
                f"belong to its share of the data; resume with the settings the checkpoint was saved with.{hint}"
            )
        self._restore_deal(state["deal"])
        self.loader.load_state_dict(state["loader"])
        self._skipped_by_worker = {worker: dict(counts) for worker, counts in state["skipped_by_worker"].items()}
        self.skip_examples = dict(state["skip_examples"])
        self.samples_seen = state["samples_seen"]

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume from every rank's saved state (`states[r]` is rank r's `state_dict()`), on the saved layout exactly,
        or on another world size or `num_workers` by re-dealing what no rank has consumed (map-style data only)."""
        saved = _check_complete(states)
        if saved["world_size"] == self.stream.world_size and saved["num_workers"] == self.config.num_workers:
            self.load_state_dict(states[self.stream.rank])
            return
        changed = {key: values for key, values in self._changes(saved).items() if key not in LAYOUT_KEYS}
        if changed:
            raise ValueError(f"cannot resume the data pipeline: {_describe(changed)}; only the layout may change.")
        old_layout = f"{saved['world_size']} ranks x {max(saved['num_workers'], 1)} readers each"
        new_layout = f"{self.stream.world_size} x {max(self.config.num_workers, 1)}"
        if self.stream.deal is None:
            raise ValueError(
                f"cannot resume the stream of {describe_data(self.config)} on {new_layout} readers: it was saved on "
                f"{old_layout}. Each reader's position is a place in its own split of the stream, which cannot be "
                f"re-dealt to other readers. Resume with {saved['world_size']} processes and num_workers "
                f"{saved['num_workers']}, or load the data set without streaming (map-style data can be re-dealt)."
            )
        config = self.config
        old_deal = Deal.from_state(states[0]["deal"], self.stream.deal.size, config.seed, config.shuffle)
        progress = [
            reader_progress(worker_state, reader_index(rank, saved["world_size"], worker), old_deal)
            for rank, state in enumerate(states)
            for worker, worker_state in _worker_states(state["loader"]).items()
        ]
        if sorted(p.reader for p in progress) != list(range(old_deal.readers)):
            readers = sorted(p.reader for p in progress)
            raise ValueError(f"the saved states hold readers {readers}, not the {old_layout} of their layout")
        if all(state["loader"].get("_iterator_finished") for state in states):
            # Every rank had ended its pass; torchdata starts the next pass afresh, and so does a re-deal.
            self.stream.deal = Deal(old_deal.size, self.stream.deal.readers, config.seed, config.shuffle)
        else:
            self.stream.deal = redeal(old_deal, progress, self.stream.deal.readers, config.num_epochs)
        self.stream.load_state_dict({})
        self.loader.load_state_dict({})  # a fresh start of every worker, under the new deal
        first = self.stream.rank == 0  # the old ranks' counts go to one new rank, so that sums stay right
        carried: Counter[str] = Counter()
        for state in reversed(states):
            for counts in state["skipped_by_worker"].values():
                carried.update(counts)
        self._skipped_by_worker = {"carried": dict(carried)} if first and carried else {}
        self.skip_examples = {}
        if first:
            for state in states:
                for reason, description in state["skip_examples"].items():
                    self.skip_examples.setdefault(reason, description)
        self.samples_seen = sum(state["samples_seen"] for state in states) if first else 0

    def _changes(self, saved: dict) -> dict:
        current = self._layout()
        return {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}

    def _restore_deal(self, state: dict | None) -> None:
        if self.stream.deal is not None:
            config = self.config
            self.stream.deal = Deal.from_state(state, self.stream.deal.size, config.seed, config.shuffle)


def _describe(changed: dict) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())


def _check_complete(states: list[dict]) -> dict:
    """The saved layout, once sure that `states` are all the ranks of one run, in rank order."""
    if not states:
        raise ValueError("no saved data states to resume from")
    saved = states[0]["layout"]
    ranks = [state["layout"]["rank"] for state in states]
    if ranks != list(range(saved["world_size"])):
        raise ValueError(f"expected the states of ranks 0..{saved['world_size'] - 1} in order, got ranks {ranks}")
    return saved


def _worker_states(loader_state: dict) -> dict[int, dict]:
    """Each worker's `PackedBatchStream.state_dict()` inside a `StatefulDataLoader.state_dict()` (torchdata 0.11)."""
    snapshot = loader_state.get("_snapshot")
    if snapshot is None:  # no workers: the dataset's state is at the top
        return {0: loader_state.get("dataset_state") or {}}
    return {
        worker["worker_id"]: worker.get("dataset_state") or {} for worker in snapshot["_worker_snapshots"].values()
    }
