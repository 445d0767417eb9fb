"""One loader worker's stream of packed batches, and the state that restores it exactly.

A worker reads its share of the rank's data (see `sources`), turns each example into a sample
(`formats.SampleMaker`), buffers samples in a `PackingBuffer` and, whenever the buffer holds enough, packs and
collates one batch. It yields `(batch, report)`, where the report carries the worker's skip counts and the batch's
packing statistics for the main process; a final `(None, report)` carries skips made after the last batch.

State, without pixels: the reader position just before the oldest sample still buffered, which examples read since
then are still buffered (and the batch at which each arrived), and the skip counts. Restoring re-reads from that
position and processes again only the buffered examples, which rebuilds the buffer exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from torch.utils.data import IterableDataset, get_worker_info

from ..collator import MultimodalPackingCollator, PackingStats
from .config import DataConfig
from .formats import BadSampleError, ColumnMap, SampleMaker, SkippedSample
from .packing import PackingBuffer
from .sources import column_names, make_reader, open_source


class PackedBatchStream(IterableDataset):
    """The rank's data as `(batch, report)` pairs, each loader worker producing its own share."""

    def __init__(self, config: DataConfig, processor, seq_len: int, rank: int = 0, world_size: int = 1):
        self.config, self.seq_len, self.rank, self.world_size = config, seq_len, rank, world_size
        self.source = open_source(config, rank, world_size, image_token=processor.image_token)
        columns = ColumnMap(
            config.format,
            config.image_column,
            config.text_column,
            config.images_column,
            config.texts_column,
            config.messages_column,
            column_names(self.source),
        ).resolved()
        self.make_sample = SampleMaker(
            processor, columns, seq_len, config.max_images_per_batch, config.image_root, config.append_eos
        )
        self.collator = MultimodalPackingCollator.from_processor(processor, seq_len, config.max_images_per_batch)
        self._resume_state: dict | None = None
        self._live = None  # the running iteration, whose state `state_dict` reports

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = state
        self._live = None

    def state_dict(self) -> dict:
        return self._live.state() if self._live is not None else (self._resume_state or {})

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        config = self.config
        reader = make_reader(
            self.source, worker, num_workers, self.rank, config.seed, config.shuffle, config.num_epochs
        )
        buffer = PackingBuffer(
            self.seq_len,
            config.rows_per_batch,
            config.max_images_per_batch,
            config.packing_lookahead,
            config.packing_max_wait,
        )
        # A later pass over the loader starts where this one ends, not again from the restored state.
        resume, self._resume_state = self._resume_state, None
        self._live = _WorkerProgress(worker, reader, buffer, resume)
        return self._batches(self._live)

    def _batches(self, live: _WorkerProgress):
        examples = iter(live.reader)
        for _ in range(live.replay_count):
            position = live.reader.state()
            name, example = next(examples)
            sample = None
            if live.is_buffered(live.next_seq):
                try:
                    sample = self.make_sample(example, name)
                except SkippedSample as skip:
                    raise RuntimeError(
                        f"{name} was buffered when the state was saved but now fails ({skip}): "
                        "has the data or the processor changed since?"
                    ) from skip
            live.replay(sample, position)
        live.resume_state = None
        while True:
            while live.buffer.ready():
                yield self._emit(live)
            position = live.reader.state()
            name, example = next(examples, (None, None))
            if name is None:
                break
            try:
                live.add(self.make_sample(example, name), position)
            except SkippedSample as skip:
                if self.config.strict:
                    raise BadSampleError(f"{self.config.split} {name}: {skip}") from skip
                live.skip(skip.reason)
        while len(live.buffer):
            yield self._emit(live)
        if live.unreported_skips:
            live.unreported_skips = False
            yield None, live.report(None)  # skips after the last batch must still reach the trainer

    def _emit(self, live: _WorkerProgress):
        rows = live.take()
        batch = self.collator.collate_rows([[sample.payload for sample in row] for row in rows])
        live.unreported_skips = False
        return batch, live.report(self.collator.last_stats)


class _WorkerProgress:
    """What one worker has read, buffered, emitted and skipped; `state()` is all a restore needs."""

    def __init__(self, worker: int, reader, buffer: PackingBuffer, resume: dict | None):
        self.worker, self.reader, self.buffer = worker, reader, buffer
        self.positions: dict[int, dict] = {}  # buffered seq -> reader state just before it was read
        self.skipped: Counter[str] = Counter()
        self.next_seq, self.replay_count, self.unreported_skips = 0, 0, False
        self._to_rebuild: dict[int, int] = {}
        self.resume_state = resume or None  # until the buffer is rebuilt, the state is still this one
        if resume:
            if resume["worker"] != worker:
                raise ValueError(f"worker {worker} was given the state of worker {resume['worker']}")
            reader.restore(resume["reader"])
            self.skipped.update(resume["skipped"])
            buffer.batches_taken = resume["batches"]
            self.next_seq = resume["base_seq"]
            self.replay_count = resume["next_seq"] - resume["base_seq"]
            self._to_rebuild = {seq: arrived_at for seq, arrived_at in resume["buffered"]}

    def is_buffered(self, seq: int) -> bool:
        return seq in self._to_rebuild

    def replay(self, sample, position: dict) -> None:
        """Take back one example read before the checkpoint: a buffered one (`sample`), or None for the others."""
        if sample is not None:
            self.buffer.add(self.next_seq, sample.length, sample.num_images, sample, self._to_rebuild[self.next_seq])
            self.positions[self.next_seq] = position
        self.next_seq += 1

    def add(self, sample, position: dict) -> None:
        self.buffer.add(self.next_seq, sample.length, sample.num_images, sample)
        self.positions[self.next_seq] = position
        self.next_seq += 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.unreported_skips = True
        self.next_seq += 1

    def take(self):
        rows = self.buffer.take()
        for row in rows:
            for sample in row:
                del self.positions[sample.key]
        return rows

    def report(self, stats: PackingStats | None) -> dict:
        return {
            "worker": self.worker,
            "skipped": dict(self.skipped),
            "stats": None if stats is None else asdict(stats),
        }

    def state(self) -> dict:
        if self.resume_state is not None:
            return self.resume_state
        buffered = [[sample.key, sample.arrived_at] for sample in self.buffer.samples]
        base_seq = min((seq for seq, _ in buffered), default=self.next_seq)
        return {
            "worker": self.worker,
            "reader": self.positions[base_seq] if buffered else self.reader.state(),
            "base_seq": base_seq,
            "next_seq": self.next_seq,
            "buffered": buffered,
            "batches": self.buffer.batches_taken,
            "skipped": dict(self.skipped),
        }
