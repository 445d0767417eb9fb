"""The data section of a training config: where examples come from and how batches are formed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where training examples come from and how batches are formed (a section of the trainer's config)."""

    dataset: str = "scenes"  # "scenes", a hub name or a `datasets` builder: parquet, json, imagefolder, webdataset
    data_files: str | None = None  # a path, a glob, or several joined by commas
    data_dir: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    streaming: bool = False
    cache_dir: str | None = None
    format: str = "auto"  # caption | interleaved | chat | text; auto finds it from the columns
    image_column: str | None = None
    text_column: str | None = None
    images_column: str | None = None
    texts_column: str | None = None
    messages_column: str | None = None
    image_root: str | None = None  # where relative image paths (LLaVA's) are
    append_eos: bool = True
    scenes_size: int = 100_000
    seed: int = 0
    shuffle: bool = True  # map-style sources: a new permutation each epoch; streams are read in order
    num_epochs: int | None = None  # None repeats forever
    rows_per_batch: int = 8
    max_images_per_batch: int | None = None
    packing_lookahead: float = 1.0  # batches' worth of tokens buffered beyond one batch
    packing_max_wait: int = 4
    num_workers: int = 0
    prefetch_factor: int | None = None
    strict: bool = False
