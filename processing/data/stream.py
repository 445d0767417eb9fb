"""One loader worker's stream of packed batches, and the state that restores it exactly.

A worker is one reader (see `sources`): it reads its share of the data, turns each example into a sample
(`formats.SampleMaker`), buffers samples in a `PackingBuffer` and, whenever the buffer holds enough, packs and
collates one batch. It yields `(batch, report)`, where the report carries, for the main process, the sample ids of
the batch (row by row), the batch's packing statistics, the worker's skip counts and the first skipped example of
each reason not yet reported; a final `(None, report)` carries skips made after the last batch.

State, without pixels: the reader position just before the oldest sample still buffered, which examples read since
then are still buffered (and the batch at which each arrived), and the skip counts. Restoring re-reads from that
position and processes again only the buffered examples, which rebuilds the buffer exactly. The same state says
what the worker has consumed, which is what re-dealing needs (`reader_progress`).

A reader that skips every example of a whole epoch of its share would otherwise read the data forever without
yielding (a LLaVA JSON with a wrong image_root hangs at step 0 that way); it raises `NoUsableSamplesError` once it
has skipped a whole epoch and at least `QUIET_LIMIT` examples in a row. The second condition is for small shares: a
share of a few examples can be all bad by chance in a mostly good data set (at 50 % bad, 32 in a row happen once
in 4e9). A reader whose share is empty (more readers than examples) reads nothing and ends; the others go on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from torch.utils.data import IterableDataset, get_worker_info

from ..collator import MultimodalPackingCollator, PackingStats
from .config import DataConfig
from .formats import BadSampleError, SampleMaker, SkippedSample
from .health import likely_fix
from .packing import PackingBuffer
from .sources import (
    Deal,
    Example,
    MapReader,
    ReaderProgress,
    StreamReader,
    column_map,
    column_names,
    data_errors,
    is_stream,
    open_source,
    reader_index,
)

QUIET_LIMIT = 32  # skipped examples in a row, beyond a whole epoch of the share, before a reader gives up


class NoUsableSamplesError(RuntimeError):
    """A reader skipped every example of a whole epoch of its share: the data set (or its config) yields nothing."""


def describe_data(config: DataConfig) -> str:
    where = config.data_files or config.data_dir
    return f"data set {config.dataset!r}" + (f" ({where})" if where else "") + f" split {config.split!r}"


class PackedBatchStream(IterableDataset):
    """The rank's data as `(batch, report)` pairs, each loader worker producing its own share."""

    def __init__(self, config: DataConfig, processor, seq_len: int, rank: int = 0, world_size: int = 1):
        self.config, self.seq_len, self.rank, self.world_size = config, seq_len, rank, world_size
        self.source = open_source(config, rank, world_size, image_token=processor.image_token)
        self.errors = None if config.dataset == "scenes" else data_errors(config)
        self.deal: Deal | None = None  # None for streams
        if not is_stream(self.source):
            if len(self.source) < world_size:
                raise ValueError(
                    f"{describe_data(config)} has {len(self.source)} examples, fewer than the {world_size} ranks: "
                    "some ranks would have nothing to train on. Use fewer processes or more data."
                )
            readers = world_size * max(config.num_workers, 1)
            self.deal = Deal(len(self.source), readers, config.seed, config.shuffle)
        columns = column_map(config, column_names(self.source, self.errors)).resolved()
        self.make_sample = SampleMaker(
            processor,
            columns,
            seq_len,
            config.max_images_per_batch,
            config.image_root,
            config.append_eos,
            allow_paths_outside_image_root=config.allow_paths_outside_image_root,
            max_image_bytes=config.max_image_bytes,
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
        if self.deal is None:
            reader = StreamReader(
                self.source, self.rank, self.world_size, worker, num_workers, config.num_epochs, self.errors
            )
        else:
            if self.deal.readers != self.world_size * num_workers:
                raise ValueError(f"the deal is for {self.deal.readers} readers, not {self.world_size} x {num_workers}")
            reader = MapReader(
                self.source,
                self.deal,
                reader_index(self.rank, self.world_size, worker),
                config.num_epochs,
                self.errors,
            )
        buffer = PackingBuffer(
            self.seq_len,
            config.rows_per_batch,
            config.max_images_per_batch,
            config.packing_lookahead,
            config.packing_max_wait,
        )
        # A later pass over the loader starts afresh, as torchdata's does, not again from the restored state.
        resume, self._resume_state = self._resume_state, None
        self._live = _WorkerProgress(worker, reader, buffer, resume)
        return self._batches(self._live)

    def _batches(self, live: _WorkerProgress):
        examples = iter(live.reader)
        for _ in range(live.replay_count):
            position = live.reader.state()
            example = next(examples)
            sample = None
            if live.is_buffered(live.next_seq):
                try:
                    sample = self.make_sample(example.data, example.name)
                except SkippedSample as skip:
                    raise RuntimeError(
                        f"{example.name} was buffered when the state was saved but now fails ({skip}): "
                        "has the data or the processor changed since?"
                    ) from skip
            live.replay(sample, position, example.id)
        live.resume_state = None
        while True:
            while live.buffer.ready():
                yield self._emit(live)
            position = live.reader.state()
            example = next(examples, None)
            if example is None:
                break
            try:
                live.add(self.make_sample(example.data, example.name), position, example.id)
            except SkippedSample as skip:
                if self.config.strict:
                    raise BadSampleError(f"{self.config.split} {example.name}: {skip}") from skip
                live.skip(skip, example)
                self._check_not_quiet(live, ended=False)
        self._check_not_quiet(live, ended=True)
        while len(live.buffer):
            yield self._emit(live)
        if live.unreported_skips:
            yield None, live.report(None, [])  # skips after the last batch must still reach the trainer

    def _emit(self, live: _WorkerProgress):
        rows, sample_ids = live.take()
        batch = self.collator.collate_rows([[sample.payload for sample in row] for row in rows])
        return batch, live.report(self.collator.last_stats, sample_ids)

    def _check_not_quiet(self, live: _WorkerProgress, ended: bool) -> None:
        """Raise if the current run of skips covers a whole epoch of the share and `QUIET_LIMIT` examples."""
        if live.quiet_reads < QUIET_LIMIT or live.quiet_whole_from is None:
            return
        # A skip read in a later epoch than the first whole one, or the reader's end, closes that epoch.
        last, whole = live.quiet_last_epoch, live.quiet_whole_from
        if not (last > whole or (ended and last >= whole)):
            return
        info = get_worker_info()
        worker = 0 if info is None else info.id
        reasons = "; ".join(
            f"{reason} x{count}, e.g. {live.quiet_examples[reason]}" for reason, count in live.quiet.most_common(3)
        )
        where = f"rank {self.rank}, worker {worker}"
        top = live.quiet.most_common(1)[0][0]
        raise NoUsableSamplesError(
            f"{describe_data(self.config)}: the reader of {where} skipped every example of a whole epoch of its "
            f"share ({live.quiet_reads} in a row) and made no sample, so it would read forever without a batch. "
            f"Skipped: {reasons}. Likely fix: {likely_fix(top, live.quiet_examples[top])}."
        )


def reader_progress(worker_state: dict, reader: int, deal: Deal) -> ReaderProgress:
    """What a map-style worker's saved state says it consumed: all before its saved reader position, then every
    example read since except those still buffered (which count as not yet seen)."""
    if not worker_state:  # a worker that had not started
        return ReaderProgress(reader, deal.start, 0, [])
    buffered = {seq for seq, _ in worker_state["buffered"]}
    consumed_after = [seq not in buffered for seq in range(worker_state["base_seq"], worker_state["next_seq"])]
    return ReaderProgress(reader, worker_state["reader"]["epoch"], worker_state["reader"]["cursor"], consumed_after)


class _WorkerProgress:
    """What one worker has read, buffered, emitted and skipped; `state()` is all a restore needs."""

    def __init__(self, worker: int, reader, buffer: PackingBuffer, resume: dict | None):
        self.worker, self.reader, self.buffer = worker, reader, buffer
        self.pending: dict[int, tuple[dict, int]] = {}  # buffered seq -> (reader state just before it, sample id)
        self.skipped: Counter[str] = Counter()
        self.new_skip_examples: dict[str, str] = {}  # first skipped example of each reason, until reported
        self.reported_reasons: set[str] = set()
        self.next_seq, self.replay_count, self.unreported_skips = 0, 0, False
        # The current run of skipped examples: how long, which reasons (one example each), and its epochs.
        self.quiet, self.quiet_examples, self.quiet_reads = Counter(), {}, 0
        self.quiet_whole_from: int | None = None  # first epoch that the run covers from its start
        self.quiet_last_epoch = -1
        self._to_rebuild: dict[int, int] = {}
        self.resume_state = resume or None  # until the buffer is rebuilt, the state is still this one
        if resume:
            if resume["worker"] != worker:
                raise ValueError(f"worker {worker} was given the state of worker {resume['worker']}")
            reader.restore(resume["reader"])
            self.skipped.update(resume["skipped"])
            self.reported_reasons.update(resume["skipped"])
            buffer.batches_taken = resume["batches"]
            self.next_seq = resume["base_seq"]
            self.replay_count = resume["next_seq"] - resume["base_seq"]
            self._to_rebuild = {seq: arrived_at for seq, arrived_at in resume["buffered"]}

    def is_buffered(self, seq: int) -> bool:
        return seq in self._to_rebuild

    def replay(self, sample, position: dict, sample_id: int) -> None:
        """Take back one example read before the checkpoint: a buffered one (`sample`), or None for the others."""
        if sample is not None:
            self.buffer.add(self.next_seq, sample.length, sample.num_images, sample, self._to_rebuild[self.next_seq])
            self.pending[self.next_seq] = (position, sample_id)
        self.next_seq += 1

    def add(self, sample, position: dict, sample_id: int) -> None:
        self.buffer.add(self.next_seq, sample.length, sample.num_images, sample)
        self.pending[self.next_seq] = (position, sample_id)
        self.next_seq += 1
        self.quiet, self.quiet_examples, self.quiet_reads, self.quiet_whole_from = Counter(), {}, 0, None

    def skip(self, skip: SkippedSample, example: Example) -> None:
        self.skipped[skip.reason] += 1
        self.unreported_skips = True
        self.next_seq += 1
        description = f"{example.name}: {skip}"
        if skip.reason not in self.reported_reasons:
            self.reported_reasons.add(skip.reason)
            self.new_skip_examples[skip.reason] = description
        if self.quiet_reads == 0:
            self.quiet_whole_from = example.epoch if example.opens_epoch else example.epoch + 1
        self.quiet[skip.reason] += 1
        self.quiet_examples.setdefault(skip.reason, description)
        self.quiet_reads += 1
        self.quiet_last_epoch = example.epoch

    def take(self) -> tuple[list, list[int]]:
        """The next batch's rows, and the sample ids in them, row by row."""
        rows = self.buffer.take()
        sample_ids = [self.pending.pop(sample.key)[1] for row in rows for sample in row]
        return rows, sample_ids

    def report(self, stats: PackingStats | None, sample_ids: list[int]) -> dict:
        report = {
            "worker": self.worker,
            "skipped": dict(self.skipped),
            "skip_examples": self.new_skip_examples,
            "stats": None if stats is None else asdict(stats),
            "sample_ids": sample_ids,
        }
        self.new_skip_examples, self.unreported_skips = {}, False
        return report

    def state(self) -> dict:
        if self.resume_state is not None:
            return self.resume_state
        buffered = [[sample.key, sample.arrived_at] for sample in self.buffer.samples]
        base_seq = min((seq for seq, _ in buffered), default=self.next_seq)
        return {
            "worker": self.worker,
            "reader": self.pending[base_seq][0] if buffered else self.reader.state(),
            "base_seq": base_seq,
            "next_seq": self.next_seq,
            "buffered": buffered,
            "batches": self.buffer.batches_taken,
            "skipped": dict(self.skipped),
        }
