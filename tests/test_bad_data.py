"""Real data is messy: every bad example is one counted skip with its reason, bad files raise naming the file, image
paths stay under image_root, and a run on mostly bad data stops early saying why."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from processing.data import DataConfig, NoUsableSamplesError, build_train_dataloader
from processing.data.formats import (
    SKIP_REASONS,
    ColumnMap,
    SampleMaker,
    SkippedSample,
    webdataset_features,
)
from processing.data.health import (
    DataQualityError,
    DataSourceError,
    SkipRateGuard,
    describe_skips,
    explain_data_errors,
)
from processing.image_processing_llama3_siglip2 import Llama3Siglip2ImageProcessor
from processing.processing_llama3_siglip2 import Llama3Siglip2Processor
from processing.tokenizer import IMAGE_TOKEN, build_byte_level_bpe_tokenizer

SEQ_LEN = 96


@pytest.fixture(scope="module")
def processor():
    texts = ["a photo of an astronaut", "what is this?", "caption number 0123456789"]
    tokenizer = build_byte_level_bpe_tokenizer(texts, vocab_size=300)
    image_processor = Llama3Siglip2ImageProcessor(patch_size=8, merge_size=2, max_patches=64)
    return Llama3Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def photo_png(size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """A folder with one real photo, `photo.png`, and a sibling folder with `secret.png` outside it."""
    base = tmp_path_factory.mktemp("data")
    (base / "images").mkdir()
    (base / "images" / "photo.png").write_bytes(photo_png())
    (base / "secret.png").write_bytes(photo_png())
    return base / "images"


def maker(processor, columns: tuple[str, ...], image_root=None, **options) -> SampleMaker:
    resolved = ColumnMap(columns=columns, **options.pop("column_options", {})).resolved()
    return SampleMaker(processor, resolved, SEQ_LEN, image_root=None if image_root is None else str(image_root),
                       **options)


def skip_of(make, example) -> SkippedSample:
    with pytest.raises(SkippedSample) as skip:
        make(example)
    return skip.value


def llava(image, *turns) -> dict:
    return {"image": image, "conversations": [dict(zip(("from", "value"), turn)) for turn in turns]}


GOOD_TURNS = (("human", "<image>\nWhat is this?"), ("gpt", "a photo of an astronaut"))
PNG = photo_png()


# Every bad shape is one counted skip with its reason


def test_llava_turns_with_null_value_or_from_are_counted_skips_and_the_good_ones_arrive(
    processor, image_root, tmp_path
):
    rows = [llava("photo.png", *GOOD_TURNS) for _ in range(4)]
    rows += [
        llava("photo.png", ("human", "<image>\nWhat is this?"), ("gpt", None)),  # "value": null
        llava("photo.png", (None, "<image>\nWhat is this?"), ("gpt", "an astronaut")),  # "from": null
        llava("photo.png", ("human", "<image>\nWhat?"), ("narrator", "an astronaut")),
        {"image": "photo.png", "conversations": None},
        llava("../secret.png", *GOOD_TURNS),
        llava("missing.png", *GOOD_TURNS),
    ]
    path = tmp_path / "llava.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(dataset="json", data_files=str(path), image_root=str(image_root), num_epochs=1,
                        rows_per_batch=2, max_images_per_batch=8)
    loader = build_train_dataloader(config, processor, SEQ_LEN)
    list(loader)
    assert loader.samples_seen == 4
    assert dict(loader.skipped) == {
        "missing_field": 3,
        "unknown_role": 1,
        "path_outside_image_root": 1,
        "invalid_image": 1,
    }


LLAVA = ("conversations", "image")
CASES = [
    # (columns, example, reason, what the message says)
    (LLAVA, llava("photo.png", GOOD_TURNS[0], ("gpt", None)), "missing_field", r"message 1 \(from 'gpt'\) has no"),
    (LLAVA, llava("photo.png", (None, "<image>hi"), GOOD_TURNS[1]), "missing_field", r"message 0 has no role"),
    (LLAVA, llava("photo.png", ("bob", "<image>hi"), GOOD_TURNS[1]), "unknown_role", r"role 'bob' is none of"),
    (LLAVA, llava("photo.png", (7, "<image>hi"), GOOD_TURNS[1]), "malformed_example", r"'from' is int 7, not a role"),
    (LLAVA, llava("photo.png", GOOD_TURNS[0], ("gpt", 3)), "malformed_example", r"'value' is int 3, not text"),
    (LLAVA, llava("photo.png", GOOD_TURNS[0], ("gpt", ["a"])), "malformed_example", r"part 0 is str 'a', not a dict"),
    (LLAVA, {"image": "photo.png", "conversations": ["<image>hi", "an astronaut"]}, "malformed_example",
     r"message 0 is str '<image>hi', not a dict"),
    (LLAVA, {"image": "photo.png", "conversations": "<image>hi"}, "malformed_example",
     r"column 'conversations' is str '<image>hi', not a list"),
    (LLAVA, {"image": "photo.png", "conversations": None}, "missing_field", r"'conversations' is null"),
    (LLAVA, {"image": "photo.png"}, "missing_field", r"no column 'conversations' \(it has \['image'\]\)"),
    (LLAVA, llava("photo.png", ("human", "hi"), ("gpt", "a")), "placeholder_mismatch", r"0 image parts .* but 1"),
    (LLAVA, llava({"path": None, "bytes": None}, *GOOD_TURNS), "invalid_image", r"neither 'bytes' nor 'path'"),
    (LLAVA, llava({"url": "x"}, *GOOD_TURNS), "invalid_image", r"image 0 is dict \{'url': 'x'\}, with neither"),
    (LLAVA, llava(True, *GOOD_TURNS), "invalid_image", r"unsupported image input of type bool"),
    (LLAVA, ["not", "a", "dict"], "malformed_example", r"the example is list .*, not a mapping of columns"),
    (("messages", "images"), {"messages": [{"role": "user", "content": [{"type": "video"}]}], "images": None},
     "malformed_example", r"part 0 has type 'video'"),
    (("messages", "images"), {"messages": [{"role": "assistant", "content": [{"type": "text", "text": 5}]}]},
     "malformed_example", r"part 0: 'text' is int 5, not text"),
    (("jpg", "txt"), {"jpg": None, "txt": "a cat"}, "missing_field", r"column 'jpg' is null"),
    (("jpg", "txt"), {"jpg": PNG, "txt": 5}, "malformed_example", r"column 'txt' is int 5, not text"),
    (("jpg", "txt"), {"jpg": PNG, "txt": b"caf\xe9"}, "malformed_example", r"column 'txt' is bytes that are not UTF"),
    (("jpg", "txt"), {"jpg": PNG, "txt": "lone \ud800"}, "malformed_example", r"not valid Unicode"),
    (("jpg", "txt"), {"jpg": {"foo": 1}, "txt": "x"}, "invalid_image", r"neither 'bytes' nor 'path'"),
    (("text", "images"), {"text": ["a"], "images": None}, "malformed_example", r"column 'text' is list"),
    (("texts", "images"), {"texts": "ab", "images": [None]}, "malformed_example", r"column 'texts' is str 'ab'"),
    (("texts", "images"), {"texts": ["a", 5], "images": [None, None]}, "malformed_example", r"'texts' position 1 is"),
    (("texts", "images"), {"texts": ["a"], "images": [None, None]}, "placeholder_mismatch", r"1 texts but 2 image"),
]


@pytest.mark.parametrize("columns, example, reason, message", CASES)
def test_each_bad_shape_is_a_skip_with_its_reason_and_a_message_naming_the_field(
    processor, image_root, columns, example, reason, message
):
    skip = skip_of(maker(processor, columns, image_root), example)
    assert skip.reason == reason
    assert re.search(message, str(skip)), str(skip)


def test_the_good_shapes_of_each_format_make_samples(processor, image_root):
    assert maker(processor, LLAVA, image_root)(llava("photo.png", *GOOD_TURNS)).length > 0
    assert maker(processor, ("jpg", "txt"))({"jpg": PNG, "txt": b"an astronaut"}).length > 0  # a .caption file
    assert maker(processor, ("text", "images"))({"text": IMAGE_TOKEN + "hi", "images": {"bytes": PNG}}).length > 0


# Arbitrary junk in a record is a counted skip with a known reason, never an exception or an unexpected_ reason

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        ["human", "gpt", "user", "assistant", "system", "image", "text", "photo.png", "../secret.png", "/etc/passwd",
         "<image>", "<image>\nWhat is this?", "an astronaut", IMAGE_TOKEN, "<|begin_of_image|>", "lone \ud800", ""]
    ),
)
KEYS = st.sampled_from(["from", "value", "role", "content", "type", "text", "image", "path", "bytes", "url"])
JUNK = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=12)
MESSAGE = JUNK | st.fixed_dictionaries({}, optional={"from": JUNK, "value": JUNK, "role": JUNK, "content": JUNK})
LLAVA_RECORD = st.fixed_dictionaries(
    {}, optional={"conversations": JUNK | st.lists(MESSAGE, max_size=4), "image": JUNK, "id": JUNK}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=LLAVA_RECORD)
def test_junk_in_a_llava_record_is_a_sample_or_a_skip_with_a_known_reason(processor, image_root, record):
    try:
        maker(processor, LLAVA, image_root)(record)
    except SkippedSample as skip:
        assert skip.reason in SKIP_REASONS, str(skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([("jpg", "txt"), ("text", "images"), ("texts", "images")]), st.tuples(JUNK, JUNK))
def test_junk_in_any_format_is_a_sample_or_a_skip_with_a_known_reason(processor, image_root, columns, values):
    try:
        maker(processor, columns, image_root)(dict(zip(columns, values)))
    except SkippedSample as skip:
        assert skip.reason in SKIP_REASONS, str(skip)


def test_an_unforeseen_error_is_counted_under_its_type_and_logged_once_with_its_traceback(
    processor, monkeypatch, caplog
):
    def broken(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr(processor, "process_sample", broken)
    make = maker(processor, ("jpg", "txt"))
    with caplog.at_level(logging.WARNING, logger="processing.data.formats"):
        skips = [skip_of(make, {"jpg": PNG, "txt": "an astronaut"}) for _ in range(2)]
    assert [s.reason for s in skips] == ["unexpected_TypeError"] * 2
    assert "TypeError at test_bad_data.py:" in str(skips[0]) and "boom" in str(skips[0])
    logged = [r for r in caplog.records if "unexpected_TypeError" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


# Image paths stay under image_root; files have a byte limit


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "{root}/../secret.png"])
def test_image_paths_that_leave_image_root_are_refused(processor, image_root, path):
    path = path.format(root=image_root)
    skip = skip_of(maker(processor, LLAVA, image_root), llava(path, *GOOD_TURNS))
    assert skip.reason == "path_outside_image_root" and "allow_paths_outside_image_root" in str(skip)


def test_paths_outside_image_root_load_when_the_user_allows_them(processor, image_root):
    make = maker(processor, LLAVA, image_root, allow_paths_outside_image_root=True)
    assert make(llava("../secret.png", *GOOD_TURNS)).num_images == 1
    assert make(llava(str(image_root.parent / "secret.png"), *GOOD_TURNS)).num_images == 1


def test_absolute_paths_inside_image_root_and_symlinks_in_it_load(processor, image_root):
    link = image_root / "linked.png"
    if not link.exists():
        os.symlink(image_root.parent / "secret.png", link)  # the folder is the user's: its links are trusted
    make = maker(processor, LLAVA, image_root)
    assert make(llava(str(image_root / "photo.png"), *GOOD_TURNS)).num_images == 1
    assert make(llava("linked.png", *GOOD_TURNS)).num_images == 1


def test_without_image_root_relative_paths_start_from_the_current_directory(processor, image_root, monkeypatch):
    monkeypatch.chdir(image_root.parent)
    assert maker(processor, LLAVA)(llava("images/photo.png", *GOOD_TURNS)).num_images == 1


def test_image_files_over_max_image_bytes_are_skipped_naming_the_limit(processor, image_root):
    skip = skip_of(maker(processor, LLAVA, image_root, max_image_bytes=1000), llava("photo.png", *GOOD_TURNS))
    assert skip.reason == "invalid_image" and "over the limit of 1,000 bytes" in str(skip)


# Webdataset columns that the first samples lack


def webdataset_tar(path, has_caption) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            files = [("jpg", PNG)] + ([("txt", f"caption number {i}".encode())] if has_caption(i) else [])
            for suffix, payload in files:
                info = tarfile.TarInfo(f"sample{i:03d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def captions_read(processor, stream, columns: ColumnMap) -> tuple[list[str], list[str]]:
    make = SampleMaker(processor, columns.resolved(), SEQ_LEN)
    read, skipped = [], []
    for example in stream:
        try:
            sample = make(example)
            read.append(processor.tokenizer.decode(sample.input_ids_T, skip_special_tokens=True))
        except SkippedSample as skip:
            skipped.append(skip.reason)
    return read, skipped


def test_a_caption_column_missing_from_a_webdatasets_first_samples_is_read_with_webdataset_features(
    processor, tmp_path
):
    tar = webdataset_tar(tmp_path / "late.tar", has_caption=lambda i: i >= 6)
    inferred = load_dataset("webdataset", data_files=tar, split="train", streaming=True)
    assert "txt" not in inferred.column_names  # `datasets` looked at the first 5 samples only
    with pytest.raises(ValueError, match="first 5 samples of its first tar"):
        ColumnMap(columns=inferred.column_names).resolved()
    features = webdataset_features(inferred.features, ColumnMap(columns=inferred.column_names))
    stream = load_dataset("webdataset", data_files=tar, split="train", streaming=True, features=features)
    read, skipped = captions_read(processor, stream, ColumnMap(columns=stream.column_names))
    assert read == [f"caption number {i}" for i in range(6, 10)]
    assert skipped == ["empty_text"] * 6


def test_a_webdataset_refused_for_mixed_first_samples_reads_with_the_named_columns(processor, tmp_path):
    tar = webdataset_tar(tmp_path / "mixed.tar", has_caption=lambda i: i % 2 == 1)
    with pytest.raises(DataSourceError, match=r"mixed.tar carry different file types.*--text_column txt"):
        with explain_data_errors("webdataset", tar):
            load_dataset("webdataset", data_files=tar, split="train", streaming=True)
    columns = ColumnMap(image="jpg", text="txt")
    stream = load_dataset("webdataset", data_files=tar, split="train", streaming=True,
                          features=webdataset_features(None, columns))
    read, skipped = captions_read(processor, stream, ColumnMap(image="jpg", text="txt", columns=stream.column_names))
    assert len(read) == 5 and skipped == ["empty_text"] * 5


# Files `datasets` cannot read: the error names the file and the fix


def read_through(builder: str, data_files, streaming: bool = True) -> None:
    """Open and read the data as `sources` does, inside `explain_data_errors`."""
    with explain_data_errors(builder, data_files):
        files = data_files.split(",") if "," in data_files else data_files
        for _ in load_dataset(builder, data_files=files, split="train", streaming=streaming):
            pass


@pytest.mark.parametrize("streaming", [True, False])
def test_invalid_utf8_in_a_jsonl_names_the_file_and_line(tmp_path, streaming):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match=r"latin1.jsonl line 2 is not valid UTF-8 .*re-encode"):
        read_through("json", str(path), streaming)


def test_an_empty_jsonl_is_named_instead_of_a_bare_stop_iteration(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"empty.jsonl: empty .*remove it from data_files"):
        read_through("json", str(tmp_path / "empty.jsonl"))


def test_a_truncated_parquet_shard_is_named_while_streaming(tmp_path):
    table = pa.table({"txt": ["caption"] * 200, "jpg": [PNG] * 200})
    pq.write_table(table, tmp_path / "shard-000.parquet")
    whole = (tmp_path / "shard-000.parquet").read_bytes()
    (tmp_path / "shard-001.parquet").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    files = f"{tmp_path}/shard-000.parquet,{tmp_path}/shard-001.parquet"
    with pytest.raises(DataSourceError, match=r"shard-001.parquet \(.*\) cannot be opened as parquet.*download it"):
        read_through("parquet", files)


def test_data_files_that_match_nothing_say_so(tmp_path):
    with pytest.raises(DataSourceError, match=r"data_files matches no file"):
        read_through("json", str(tmp_path / "nothing-*.jsonl"))


# Stop early on mostly bad data


def test_the_guard_raises_past_the_skip_rate_naming_the_top_reason_an_example_and_the_fix():
    guard = SkipRateGuard(max_skip_rate=0.5, min_examples=200)
    example = "example 7 of rank 0's shard: invalid_image: image 0: 'coco/1.jpg' is not a file (and not a URL)"
    with pytest.raises(DataQualityError) as error:
        guard.check(60, {"invalid_image": 130, "too_long": 10}, {"invalid_image": example})
    message = str(error.value)
    assert "140 of the 200 examples read so far (70%) were skipped, over the limit of 50%" in message
    assert "Most were invalid_image (130)" in message and "coco/1.jpg" in message
    assert "set --image_root" in message and "Other reasons: too_long 10" in message


def test_the_guard_waits_for_min_examples_and_lets_a_rate_under_the_limit_pass():
    guard = SkipRateGuard(max_skip_rate=0.5, min_examples=200)
    guard.check(0, {"invalid_image": 199})
    guard.check(150, {"too_long": 150})  # exactly 50 %
    with pytest.raises(DataQualityError, match="too_long.*raise --seq_len"):
        guard.check(150, {"too_long": 151})


@pytest.mark.parametrize(
    "reason, example, fix",
    [
        ("placeholder_mismatch", "", "placeholders"),
        ("invalid_image", "'https://x/y.jpg' is a URL", "download them first"),
        ("invalid_image", "image 0: 'a.jpg': 3,221,225,472 bytes, over the limit", "raise max_image_bytes"),
        ("path_outside_image_root", "", "point --image_root"),
        ("unexpected_KeyError", "KeyError at formats.py:10", "please report it"),
    ],
)
def test_the_guards_fix_fits_the_reason(reason, example, fix):
    with pytest.raises(DataQualityError, match=fix):
        SkipRateGuard(min_examples=1).check(0, {reason: 5}, {reason: example})


def test_the_skip_summary_fits_a_progress_bar():
    guard = SkipRateGuard()
    guard.check(1000, {"too_long": 2, "invalid_image": 10, "empty_text": 0})
    assert guard.summary() == "skipped 12 (invalid_image 10, too_long 2)"
    assert describe_skips({}) == "skipped 0"


def test_a_run_on_llava_data_without_image_root_stops_early(processor, image_root, tmp_path):
    # Without image_root, relative paths start from the current directory, where these images are not.
    rows = [llava("photo.png", *GOOD_TURNS)] * 30 + [llava(str(image_root / "photo.png"), *GOOD_TURNS)] * 10
    path = tmp_path / "llava.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(dataset="json", data_files=str(path), num_epochs=1, rows_per_batch=2, shuffle=False)
    loader = build_train_dataloader(config, processor, SEQ_LEN)
    guard = SkipRateGuard(min_examples=20)
    with pytest.raises(DataQualityError, match=r"Most were invalid_image \(\d+\); for example .*photo.png' is not a "
                       r"file.* set --image_root"):
        for _ in loader:
            guard.check(loader.samples_seen, loader.skipped, loader.skip_examples)


# Through the loader: what a user sees (`build_train_dataloader` with a DataConfig, as the trainer calls it)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def loader_config(**options) -> DataConfig:
    return DataConfig(**{"num_epochs": 1, "rows_per_batch": 2, "max_images_per_batch": 8, **options})


def test_the_loader_refuses_paths_outside_image_root_unless_the_config_allows_them(processor, image_root, tmp_path):
    path = write_jsonl(tmp_path / "outside.jsonl", [llava("../secret.png", *GOOD_TURNS)] * 3)
    refused = build_train_dataloader(loader_config(dataset="json", data_files=path, image_root=str(image_root)),
                                     processor, SEQ_LEN)
    assert not list(refused) and dict(refused.skipped) == {"path_outside_image_root": 3}
    allowed = build_train_dataloader(
        loader_config(dataset="json", data_files=path, image_root=str(image_root), allow_paths_outside_image_root=True),
        processor, SEQ_LEN,
    )
    assert list(allowed) and allowed.samples_seen == 3 and not allowed.skipped


def test_the_loader_skips_images_over_the_configs_max_image_bytes(processor, image_root, tmp_path):
    path = write_jsonl(tmp_path / "photos.jsonl", [llava("photo.png", *GOOD_TURNS)] * 3)
    options = {"dataset": "json", "data_files": path, "image_root": str(image_root)}
    under_the_default = build_train_dataloader(loader_config(**options), processor, SEQ_LEN)
    assert list(under_the_default) and under_the_default.samples_seen == 3
    loader = build_train_dataloader(loader_config(**options, max_image_bytes=1000), processor, SEQ_LEN)
    assert not list(loader) and dict(loader.skipped) == {"invalid_image": 3}
    assert "over the limit of 1,000 bytes" in loader.skip_examples["invalid_image"]


@pytest.mark.parametrize("streaming", [True, False])
def test_the_loader_reads_a_caption_column_missing_from_a_webdatasets_first_samples(processor, tmp_path, streaming):
    tar = webdataset_tar(tmp_path / "late.tar", has_caption=lambda i: i >= 6)
    loader = build_train_dataloader(loader_config(dataset="webdataset", data_files=tar, streaming=streaming),
                                    processor, SEQ_LEN)
    assert loader.stream.make_sample.columns.text == "txt"
    list(loader)
    assert loader.samples_seen == 4 and dict(loader.skipped) == {"empty_text": 6}


def test_the_loader_reads_a_webdataset_with_mixed_first_samples_by_the_named_columns(processor, tmp_path):
    tar = webdataset_tar(tmp_path / "mixed.tar", has_caption=lambda i: i % 2 == 1)
    named = loader_config(dataset="webdataset", data_files=tar, streaming=True, image_column="jpg", text_column="txt")
    loader = build_train_dataloader(named, processor, SEQ_LEN)
    list(loader)
    assert loader.samples_seen == 5 and dict(loader.skipped) == {"empty_text": 5}
    with pytest.raises(DataSourceError, match=r"mixed.tar carry different file types.*--text_column txt"):
        build_train_dataloader(loader_config(dataset="webdataset", data_files=tar, streaming=True), processor, SEQ_LEN)


@pytest.mark.parametrize("streaming", [True, False])
def test_the_loader_names_the_line_of_a_jsonl_that_is_not_utf8(processor, image_root, tmp_path, streaming):
    lines = [json.dumps(llava("photo.png", *GOOD_TURNS)).encode()] * 3
    lines[1] = lines[1].replace(b"astronaut", b"astronaut caf\xe9")
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = loader_config(dataset="json", data_files=str(tmp_path / "latin1.jsonl"), image_root=str(image_root),
                         streaming=streaming, shuffle=False)
    with pytest.raises(DataSourceError, match=r"latin1.jsonl line 2 is not valid UTF-8 .*re-encode the file"):
        list(build_train_dataloader(data, processor, SEQ_LEN))


@pytest.mark.parametrize("streaming", [True, False])
def test_the_loader_names_an_empty_jsonl(processor, tmp_path, streaming):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    data = loader_config(dataset="json", data_files=str(tmp_path / "empty.jsonl"), streaming=streaming)
    with pytest.raises(DataSourceError, match=r"empty.jsonl: empty \(no example\); remove it from data_files"):
        build_train_dataloader(data, processor, SEQ_LEN)


@pytest.mark.parametrize("streaming", [True, False])
def test_the_loader_says_when_data_files_match_nothing(processor, tmp_path, streaming):
    data = loader_config(dataset="json", data_files=str(tmp_path / "nothing-*.jsonl"), streaming=streaming)
    with pytest.raises(DataSourceError, match=r"data_files matches no file; check the path or glob .*nothing-\*"):
        build_train_dataloader(data, processor, SEQ_LEN)


def parquet_shards_one_truncated(tmp_path) -> str:
    """shard-000 (captions 0..39) and shard-002 (40..79) whole; shard-001 cut in half, like an interrupted copy."""
    for shard, first in ((0, 0), (1, 0), (2, 40)):
        table = pa.table({"txt": [f"caption number {i}" for i in range(first, first + 40)], "jpg": [PNG] * 40})
        pq.write_table(table, tmp_path / f"shard-00{shard}.parquet")
    whole = (tmp_path / "shard-001.parquet").read_bytes()
    (tmp_path / "shard-001.parquet").write_bytes(whole[: len(whole) // 2])
    return ",".join(str(tmp_path / f"shard-00{shard}.parquet") for shard in range(3))


TRUNCATED = r"shard-001.parquet \(.*\) cannot be opened as parquet .*download it again.*on_bad_files='warn'"


def test_the_loader_names_a_truncated_parquet_shard_when_opening_it(processor, tmp_path):
    data = loader_config(dataset="parquet", data_files=parquet_shards_one_truncated(tmp_path))
    with pytest.raises(DataSourceError, match=TRUNCATED):
        build_train_dataloader(data, processor, SEQ_LEN)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_names_a_truncated_parquet_shard_when_it_reaches_it(processor, tmp_path, num_workers):
    data = loader_config(dataset="parquet", data_files=parquet_shards_one_truncated(tmp_path), streaming=True,
                         num_workers=num_workers)
    loader = build_train_dataloader(data, processor, SEQ_LEN)  # a stream opens each shard only when it gets to it
    with pytest.raises(DataSourceError, match=TRUNCATED):
        list(loader)


@pytest.mark.parametrize("streaming", [True, False])
def test_on_bad_files_warn_skips_a_truncated_shard_naming_it_and_trains_on_the_rest(
    processor, tmp_path, streaming, caplog
):
    data = loader_config(dataset="parquet", data_files=parquet_shards_one_truncated(tmp_path), streaming=streaming,
                         on_bad_files="warn")
    with caplog.at_level(logging.WARNING):
        loader = build_train_dataloader(data, processor, SEQ_LEN)
        list(loader)
    assert loader.samples_seen == 80 and not loader.skipped
    assert any("shard-001.parquet" in record.getMessage() for record in caplog.records)


def test_on_bad_files_for_a_builder_that_cannot_skip_files_is_refused(processor, image_root, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [llava("photo.png", *GOOD_TURNS)])
    with pytest.raises(ValueError, match=r"on_bad_files='warn' needs .*parquet.*'json' cannot"):
        build_train_dataloader(loader_config(dataset="json", data_files=path, on_bad_files="warn"), processor, SEQ_LEN)


def test_llava_json_with_a_wrong_image_root_stops_naming_the_file_and_the_fix(processor, image_root, tmp_path):
    path = write_jsonl(tmp_path / "llava.jsonl", [llava(f"{i}.png", *GOOD_TURNS) for i in range(8)])
    data = loader_config(dataset="json", data_files=path, image_root=str(tmp_path / "nowhere"), num_epochs=None,
                         num_workers=2)
    with pytest.raises(NoUsableSamplesError) as error:
        next(iter(build_train_dataloader(data, processor, SEQ_LEN)))
    message = str(error.value)
    assert path in message and re.search(r"nowhere/\d\.png' is not a file", message)
    assert "Likely fix: image paths do not point at files: set --image_root" in message
