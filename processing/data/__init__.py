"""The training data pipeline: raw examples to packed batches, in loader workers, with exact resume.

Needs `datasets` and `torchdata` (the `train` extra). Its modules, in the order data flows through them:

    config.py    DataConfig: the data section of a training config
    formats.py   one raw example -> one packed sample, or `SkippedSample` with its reason
    health.py    SkipRateGuard for mostly bad data; errors of unreadable files explained (`DataSourceError`)
    sources.py   open the data set, shard it across ranks, read each loader worker's share (`MapReader`, `StreamReader`)
    packing.py   PackingBuffer: which buffered samples go into the next batch
    stream.py    PackedBatchStream: one loader worker's stream of collated batches, and its resumable state
    loader.py    PackedDataLoader / build_train_dataloader: the workers behind torchdata's StatefulDataLoader

Each imports only those above it (and the rest of `processing`).

What a trainer catches: `DataSourceError` (a file cannot be read; the message names it and the fix),
`NoUsableSamplesError` (a reader skipped a whole epoch of examples), `DataQualityError` (raised by `SkipRateGuard`
past its skip rate) and, with `strict`, `BadSampleError` (the first bad example).
"""

from .config import DataConfig
from .formats import SKIP_REASONS, BadSampleError, SkippedSample
from .health import DataQualityError, DataSourceError, SkipRateGuard
from .loader import PackedDataLoader, build_train_dataloader
from .stream import NoUsableSamplesError

__all__ = [
    "SKIP_REASONS",
    "BadSampleError",
    "DataConfig",
    "DataQualityError",
    "DataSourceError",
    "NoUsableSamplesError",
    "PackedDataLoader",
    "SkipRateGuard",
    "SkippedSample",
    "build_train_dataloader",
]
