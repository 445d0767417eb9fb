"""The data section of a training config: where examples come from and how batches are formed."""

from __future__ import annotations

from dataclasses import dataclass

from ..image_loading import MAX_IMAGE_BYTES

ON_BAD_FILES = ("error", "warn", "skip")  # `datasets`' own choices (its parquet builder's `on_bad_files`)


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
    image_root: str | None = None  # where relative image paths (LLaVA's) start; unset: the current directory
    allow_paths_outside_image_root: bool = False  # `../` and absolute paths elsewhere; only for trusted data
    max_image_bytes: int = MAX_IMAGE_BYTES  # an encoded image file over this is a skipped invalid_image
    # A file that cannot be read (a truncated parquet shard): "error" stops the run naming it, "warn" skips the
    # file and logs it, "skip" skips it silently. Only builders that can skip files take it (parquet).
    on_bad_files: str = "error"
    append_eos: bool = True
    scenes_size: int = 100_000
    seed: int = 0
    max_skip_rate: float = 0.5  # the trainer stops when more examples than this were skipped (health.SkipRateGuard)
    shuffle: bool = True  # map-style sources: a new permutation each epoch; streams are read in order
    num_epochs: int | None = None  # None repeats forever
    rows_per_batch: int = 8
    max_images_per_batch: int | None = None
    packing_lookahead: float = 1.0  # batches' worth of tokens buffered beyond one batch
    packing_max_wait: int = 4
    num_workers: int = 0
    prefetch_factor: int | None = None
    # Batches in page-locked memory (the loader's pinning thread), so that their copy to a GPU is queued without
    # the host first waiting for the GPU's queue to drain, which a copy from pageable memory does.
    pin_memory: bool = False
    strict: bool = False

    def __post_init__(self):
        if self.on_bad_files not in ON_BAD_FILES:
            raise ValueError(f"on_bad_files must be one of {ON_BAD_FILES}, got {self.on_bad_files!r}")
