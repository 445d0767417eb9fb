"""The training data pipeline: raw examples to packed batches, in loader workers, with exact resume.

Needs `datasets` and `torchdata` (the `train` extra). Its modules, in the order data flows through them:

    config.py    DataConfig: the data section of a training config
    sources.py   open the data set, shard it across ranks, read each loader worker's share (`make_reader`)
    formats.py   one raw example -> one packed sample, or `SkippedSample` with its reason
    packing.py   PackingBuffer: which buffered samples go into the next batch
    stream.py    PackedBatchStream: one loader worker's stream of collated batches, and its resumable state
    loader.py    PackedDataLoader / build_train_dataloader: the workers behind torchdata's StatefulDataLoader

Each imports only those above it (and the rest of `processing`).
"""

from .config import DataConfig
from .formats import SKIP_REASONS, BadSampleError, SkippedSample
from .loader import PackedDataLoader, build_train_dataloader

__all__ = ["SKIP_REASONS", "BadSampleError", "DataConfig", "PackedDataLoader", "SkippedSample", "build_train_dataloader"]
