"""Data health: stop a run whose data is mostly bad, and explain errors that `datasets` raises without naming a file.

`SkipRateGuard` watches the pipeline's skip counts and raises `DataQualityError` once more than `max_skip_rate` of the
examples read are skipped (checked from `min_examples` on), naming the top reason, one offending example and the
likely fix, instead of letting a run train for hours on the few examples that happen to be good.

`describe_data_error` turns what `datasets` raises while opening or reading files (a bare `UnicodeDecodeError`, a
`StopIteration`, "Could not open Parquet input source '<Buffer>'") into a message that names the file, the line where
one can be found, and the fix; `explain_data_errors` is the same as a context manager that raises `DataSourceError`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

from .formats import (
    EMPTY_TEXT,
    INVALID_IMAGE,
    MALFORMED_EXAMPLE,
    MISSING_FIELD,
    PATH_OUTSIDE_IMAGE_ROOT,
    PLACEHOLDER_MISMATCH,
    PROCESSOR_ERROR,
    TOO_LONG,
    TOO_MANY_IMAGES,
    UNEXPECTED_PREFIX,
    UNKNOWN_ROLE,
)


class DataQualityError(RuntimeError):
    """Too many examples were skipped; the message says which reason dominates, shows one example, and the fix."""


class DataSourceError(RuntimeError):
    """The data could not be opened or read; the message names the file and what to do about it."""


_FIXES = {
    PATH_OUTSIDE_IMAGE_ROOT: "image paths lead outside --image_root (`../` or absolute paths): point --image_root at "
    "the folder that holds all the images, or allow such paths (allow_paths_outside_image_root) if you trust the data",
    TOO_LONG: "examples are longer than a packed row: raise --seq_len, or filter out the long examples",
    TOO_MANY_IMAGES: "examples carry more images than one batch may: raise --max_images",
    PLACEHOLDER_MISMATCH: "the texts' image placeholders (<image> in LLaVA data, <|image|> otherwise) do not match "
    "the images: check --data_format and the image column options, and that the text has one placeholder per image",
    EMPTY_TEXT: "examples have no text to learn from: check that --text_column (or --messages_column) names the text",
    MISSING_FIELD: "examples lack a field the format needs: check --data_format and the column options against the "
    "data's columns",
    MALFORMED_EXAMPLE: "fields hold the wrong kind of value (a number or a list where text belongs, ...): check "
    "--data_format and the column options against the data",
    UNKNOWN_ROLE: "chat roles must be user, assistant or system (LLaVA's human and gpt are mapped): map the others "
    "before training",
    PROCESSOR_ERROR: "the processor refused the examples; the example above says why",
}
# invalid_image has many causes; the message of the example tells them apart.
_IMAGE_FIXES = (
    ("is not a file", "image paths do not point at files: set --image_root to the folder the data's relative paths "
     "start from (without it they are read from the current directory)"),
    ("is a URL", "the data names images by URL, which are never fetched: download them first (e.g. with "
     "img2dataset) and train on the files"),
    ("bytes, over the limit", "image files are over the byte limit: raise max_image_bytes if they are real images"),
    ("pixels, over the limit", "images are over the pixel limit (max_image_pixels of the image processor)"),
    ("aspect ratio", "images are too elongated for the image processor; filter them out"),
)
_UNEXPECTED_FIX = (
    "an error nobody foresaw, in the pipeline, the processor or an unusual example: the log has its traceback; "
    "please report it with the example"
)


def likely_fix(reason: str, example: str = "") -> str:
    """What most often causes `reason` (a skip reason), judged also from one example's message."""
    if reason.startswith(UNEXPECTED_PREFIX):
        return _UNEXPECTED_FIX
    if reason == INVALID_IMAGE:
        fix = next((fix for clue, fix in _IMAGE_FIXES if clue in example), None)
        return fix or "images are corrupt, truncated or not images at all: check a few of the files by hand"
    return _FIXES.get(reason, "see the example")


def describe_skips(skipped: Mapping[str, int]) -> str:
    """A short line for a progress bar: "skipped 12 (invalid_image 10, too_long 2)"."""
    total = sum(skipped.values())
    if not total:
        return "skipped 0"
    counts = ", ".join(f"{reason} {count}" for reason, count in _by_count(skipped))
    return f"skipped {total} ({counts})"


def _by_count(skipped: Mapping[str, int]) -> list[tuple[str, int]]:
    counted = [(reason, count) for reason, count in skipped.items() if count]
    return sorted(counted, key=lambda item: (-item[1], item[0]))


class SkipRateGuard:
    """`guard.check(samples_seen, skipped, skip_examples)`, after each step, raises `DataQualityError` on bad data.

    The skip rate is skipped / (samples_seen + skipped), over everything read so far, and is judged once at least
    `min_examples` examples have been read: a few bad examples at the start say little. `max_skip_rate=1` turns the
    check off.
    """

    def __init__(self, max_skip_rate: float = 0.5, min_examples: int = 200):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"max_skip_rate must be between 0 and 1, got {max_skip_rate}")
        self.max_skip_rate, self.min_examples = max_skip_rate, min_examples
        self.skipped: dict[str, int] = {}

    def check(
        self, samples_seen: int, skipped: Mapping[str, int], skip_examples: Mapping[str, str] | None = None
    ) -> None:
        """Judge the counts so far.

        Args:
            samples_seen: examples that became samples and reached a batch (the loader's `samples_seen`).
            skipped: reason -> examples skipped for it (the loader's `skipped`).
            skip_examples: reason -> a description of one skipped example, for the message.
        """
        self.skipped = dict(skipped)
        total_skipped = sum(skipped.values())
        read = samples_seen + total_skipped
        if read < self.min_examples or total_skipped <= self.max_skip_rate * read:
            return
        (top, top_count), *others = _by_count(skipped)
        example = (skip_examples or {}).get(top, "")
        shown = f"; for example {example}" if example else ""
        rest = f" Other reasons: {', '.join(f'{r} {c}' for r, c in others)}." if others else ""
        raise DataQualityError(
            f"{total_skipped} of the {read} examples read so far ({total_skipped / read:.0%}) were skipped, over the "
            f"limit of {self.max_skip_rate:.0%}. Most were {top} ({top_count}){shown}. Likely fix: "
            f"{likely_fix(top, example)}.{rest} (Raise the limit, max_skip_rate, to train on the rest anyway.)"
        )

    def summary(self) -> str:
        """The counts of the last check as a short line for a progress bar."""
        return describe_skips(self.skipped)


class explain_data_errors:  # noqa: N801 - a context manager, named like contextlib's
    """`with explain_data_errors(dataset, data_files): ...` raises any error of the body as a `DataSourceError` with
    `describe_data_error`'s message, chained to the original."""

    def __init__(self, dataset: str, data_files=None, data_dir: str | None = None):
        self.dataset, self.data_files, self.data_dir = dataset, data_files, data_dir

    def __enter__(self) -> explain_data_errors:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        # Not contextlib.contextmanager: it would take a RuntimeError raised from a StopIteration (what `datasets`
        # raises on an empty json file) for PEP 479's conversion and re-raise the bare StopIteration.
        if isinstance(error, Exception) and not isinstance(error, DataSourceError):
            raise DataSourceError(describe_data_error(error, self.dataset, self.data_files, self.data_dir)) from error
        return False


def describe_data_error(error: BaseException, dataset: str, data_files=None, data_dir: str | None = None) -> str:
    """What went wrong reading `dataset` from `data_files` (a path, glob, comma-joined list, list or dict of them):
    the file and, where it can be found, the line; and what to do. Local files are inspected to find the culprit."""
    chain = _chain(error)
    files = _local_files(data_files, data_dir)
    source = f"{dataset!r}" + (f" (data_files={data_files!r})" if data_files else "")
    for explain in (_unmatched_files, _invalid_utf8, _empty_files, _broken_parquet, _invalid_json, _mixed_webdataset):
        explanation = explain(chain, files, data_files)
        if explanation:
            return f"could not read {source}: {explanation} (from {_summary(error)})"
    return f"could not read {source}: {_summary(error)}"


def _summary(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling (`datasets` wraps the reader's error)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _local_files(data_files, data_dir: str | None) -> list[str]:
    if isinstance(data_files, Mapping):
        patterns = [p for value in data_files.values() for p in ([value] if isinstance(value, str) else value)]
    elif isinstance(data_files, str):
        patterns = data_files.split(",")
    else:
        patterns = list(data_files or [])
    if data_dir:
        patterns.append(os.path.join(data_dir, "**"))
    found = set()
    for pattern in patterns:
        if "://" in pattern:
            continue
        for path in glob.glob(os.path.expanduser(pattern.strip()), recursive=True):
            if os.path.isdir(path):
                found.update(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
            elif os.path.isfile(path):
                found.add(path)
    return sorted(found)


def _messages(chain: list[BaseException]) -> str:
    return " | ".join(_summary(e) for e in chain)


def _unmatched_files(chain, files, data_files) -> str | None:
    patterns = data_files.split(",") if isinstance(data_files, str) else data_files
    local = isinstance(patterns, list) and patterns and not any("://" in str(p) for p in patterns)
    # Only for errors of finding nothing: a hub data set's data_files are paths in its repository, not here.
    if local and not files and any(_finds_nothing(e) for e in chain):
        return f"data_files matches no file; check the path or glob {data_files!r}"
    return None


def _finds_nothing(error: BaseException) -> bool:
    names = {"FileNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError", "StopIteration"}
    return type(error).__name__ in names or "corresponds to no data" in str(error)


def _invalid_utf8(chain, files, data_files) -> str | None:
    if not any(isinstance(e, UnicodeDecodeError) for e in chain):
        return None
    for path in _text_files(files):
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return (
                        f"{path} line {number} is not valid UTF-8 (byte {line[bad.start:bad.start + 1]!r} at "
                        f"column {bad.start + 1}); `datasets` reads UTF-8 only: re-encode the file (e.g. "
                        "`iconv -f latin1 -t utf-8`) or remove the line"
                    )
    return "a data file is not valid UTF-8, and `datasets` reads UTF-8 only: re-encode it (`iconv -t utf-8`)"


def _empty_files(chain, files, data_files) -> str | None:
    if not any(_finds_nothing(e) for e in chain):
        return None
    empty = [path for path in files if _is_blank(path)]
    if empty:
        return f"{_list(empty)}: empty (no example); remove {'it' if len(empty) == 1 else 'them'} from data_files"
    return "the data yielded no example while `datasets` looked at the first ones to infer the columns"


def _broken_parquet(chain, files, data_files) -> str | None:
    if "parquet" not in _messages(chain).lower():
        return None
    import pyarrow.parquet as pq

    broken = []
    for path in (f for f in files if f.endswith(".parquet")):
        try:
            pq.ParquetFile(path).close()  # reads the footer only
        except Exception as error:  # noqa: BLE001 - any failure to open is what we are looking for
            broken.append(f"{path} ({error})")
    if broken:
        return (
            f"{_list(broken)} cannot be opened as parquet (truncated by an interrupted download or copy?): "
            "download it again or leave it out of data_files"
        )
    return None


def _invalid_json(chain, files, data_files) -> str | None:
    if "JSON parse error" not in _messages(chain):
        return None
    for path in (f for f in files if f.endswith((".jsonl", ".json"))):
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = enumerate(file, start=1) if path.endswith(".jsonl") else [(1, file.read())]
            for number, text in lines:
                try:
                    if text.strip():
                        json.loads(text)
                except json.JSONDecodeError as bad:
                    line = number if path.endswith(".jsonl") else bad.lineno
                    return f"{path} line {line} is not valid JSON ({bad.msg}): fix or remove it"
    return None


def _mixed_webdataset(chain, files, data_files) -> str | None:
    if not any("don't share the same prefix or the same types" in str(e) for e in chain):
        return None
    tar = next((f for f in files if ".tar" in f), "the first tar")
    return (
        f"the first samples of {tar} carry different file types (e.g. some have a .txt and some not), and `datasets` "
        "infers a webdataset's columns from them: name the columns (--image_column jpg --text_column txt) so that "
        "they are not inferred"
    )


def _text_files(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith((".json", ".jsonl", ".csv", ".tsv", ".txt"))]


def _is_blank(path: str) -> bool:
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > 4096 or not path.endswith((".json", ".jsonl", ".csv", ".tsv", ".txt")):
        return False
    with open(path, "rb") as file:
        return not file.read().strip()


def _list(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
