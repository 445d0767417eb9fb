"""The data pipeline reads every format and source, skips and counts bad examples, shards, and resumes exactly."""

import io
import json
import struct
import tarfile
import zlib
from functools import partial
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from processing.collator import IGNORE_INDEX
from processing.data import BadSampleError, DataConfig, build_train_dataloader
from processing.image_processing_llama3_siglip2 import Llama3Siglip2ImageProcessor
from processing.processing_llama3_siglip2 import Llama3Siglip2Processor
from processing.scenes import COLOUR_NAMES, scene_caption
from processing.tokenizer import IMAGE_TOKEN, build_byte_level_bpe_tokenizer

SEQ_LEN = 96


def tiny_processor() -> Llama3Siglip2Processor:
    texts = [scene_caption(a, b) for a in COLOUR_NAMES for b in COLOUR_NAMES] + ["caption number 0123456789"]
    tokenizer = build_byte_level_bpe_tokenizer(texts, vocab_size=400)
    image_processor = Llama3Siglip2ImageProcessor(patch_size=8, merge_size=2, max_patches=64)
    return Llama3Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def png_bytes(width=16, height=16, value=128) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (value, 255 - value, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width=64, height=64) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def caption(i: int) -> str:
    return f"caption number {i}"


def samples_of(batch, tokenizer) -> list[str]:
    """The decoded text of every sample in a batch, found by its positions restarting at 0 (padding left out)."""
    texts = []
    for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in pairwise(starts):
            if ids[start] != tokenizer.pad_token_id:
                texts.append(tokenizer.decode(ids[start:end], skip_special_tokens=True))
    return texts


def read_all(loader, tokenizer) -> list[str]:
    return [text for batch in loader for text in samples_of(batch, tokenizer)]


def captions_parquet(tmp_path, count: int, name="captions.parquet") -> str:
    data = Dataset.from_dict(
        {
            "jpg": [{"bytes": png_bytes(value=i), "path": None} for i in range(count)],
            "txt": [caption(i) for i in range(count)],
        },
        features=Features({"jpg": Image(), "txt": Value("string")}),
    )
    path = str(tmp_path / name)
    data.to_parquet(path)
    return path


def config(path: str | None = None, **overrides) -> DataConfig:
    options = {"rows_per_batch": 2, "max_images_per_batch": 8, "num_epochs": 1, "packing_lookahead": 1.0}
    if path is not None:
        options.update(dataset=path.rsplit(".", 1)[-1], data_files=path)
    return DataConfig(**{**options, **overrides})


# Formats and sources


def test_caption_pairs_from_parquet_all_arrive_with_the_image_first(processor, tmp_path):
    loader = build_train_dataloader(config(captions_parquet(tmp_path, 12)), processor, SEQ_LEN)
    batches = list(loader)
    assert sorted(t for b in batches for t in samples_of(b, processor.tokenizer)) == sorted(
        caption(i) for i in range(12)
    )
    first_tokens = batches[0]["input_ids"][0, :2].tolist()
    assert first_tokens == [processor.tokenizer.bos_token_id, processor.boi_token_id]


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_a_pinning_loader_pins_every_tensor_of_the_batch_and_keeps_it_a_batch_feature(processor, tmp_path, monkeypatch):
    """`pin_memory=True` (the trainer's setting on a GPU): torch's pinning thread walks what the workers send. The
    batch must come out a `BatchFeature` (the loop calls its `.to(device, non_blocking=True)`) with every tensor
    pinned, and the report beside it untouched. Pinning needs an accelerator, so `Tensor.pin_memory` is stood in."""
    from torch.utils.data._utils.pin_memory import pin_memory
    from transformers import BatchFeature

    loader = build_train_dataloader(config(captions_parquet(tmp_path, 12), pin_memory=True), processor, SEQ_LEN)
    assert loader.loader.pin_memory
    batch, report = next(iter(loader.loader))  # what the loader's pinning thread receives
    pinned = set()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.add(id(t)) or t.clone())
    pinned_batch, pinned_report = pin_memory((batch, report))
    assert type(pinned_batch) is BatchFeature and pinned_report == report
    assert pinned == {id(value) for value in batch.values()} and pinned_batch.keys() == batch.keys()
    assert all(torch.equal(pinned_batch[key], batch[key]) for key in batch)


def test_caption_pairs_from_a_webdataset_tar_stream(processor, tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            for suffix, data in (("jpg", jpeg_bytes(16, 16)), ("txt", caption(i).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = build_train_dataloader(
        config(dataset="webdataset", data_files=str(path), streaming=True), processor, SEQ_LEN
    )
    assert sorted(read_all(loader, processor.tokenizer)) == sorted(caption(i) for i in range(10))


def test_caption_pairs_from_an_imagefolder_with_metadata(processor, tmp_path):
    with open(tmp_path / "metadata.jsonl", "w") as metadata:
        for i in range(8):
            (tmp_path / f"{i}.png").write_bytes(png_bytes(value=i))
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": caption(i)}) + "\n")
    loader = build_train_dataloader(config(dataset="imagefolder", data_dir=str(tmp_path)), processor, SEQ_LEN)
    assert sorted(read_all(loader, processor.tokenizer)) == sorted(caption(i) for i in range(8))


def test_interleaved_documents_keep_texts_and_images_in_order(processor, tmp_path):
    image = {"bytes": png_bytes(), "path": None}
    data = Dataset.from_dict(
        {
            "texts": [[None, "first", None, "second"], ["alone", None]],
            "images": [[image, None, image, None], [None, image]],
        },
        features=Features({"texts": List(Value("string")), "images": List(Image())}),
    )
    data.to_parquet(tmp_path / "docs.parquet")
    loader = build_train_dataloader(config(str(tmp_path / "docs.parquet"), rows_per_batch=1), processor, SEQ_LEN)
    pieces = []
    for batch in loader:
        ids = batch["input_ids"][0].tolist()
        pieces += ["<image>" if t == processor.boi_token_id else processor.tokenizer.decode([t]) for t in ids]
    text = "".join(piece for piece in pieces if piece not in ("<|pad|>", "<|begin_of_text|>"))
    text = text.replace("<|image|>", "").replace("<|end_of_image|>", "").replace("<|end_of_text|>", "|")
    assert sorted(text.split("|")[:2]) == ["<image>first<image>second", "alone<image>"]


def chat_jsonl(tmp_path) -> str:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(value=10 * i))
        rows.append(
            {
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is this?"},
                    {"from": "gpt", "value": caption(i)},
                ],
            }
        )
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def targets_of(batch, tokenizer) -> list[str]:
    """The decoded label tokens of every sample in a batch (what the model learns to say)."""
    texts = []
    for ids, labels, positions in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in pairwise(starts):
            if ids[start] != tokenizer.pad_token_id:
                texts.append(
                    tokenizer.decode([t for t, l in zip(ids[start:end], labels[start:end]) if l != IGNORE_INDEX])
                )
    return texts


def test_llava_chat_learns_only_the_assistant_turns(processor, tmp_path):
    data = config(chat_jsonl(tmp_path), dataset="json", image_root=str(tmp_path / "images"), streaming=True)
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    learned = [text for batch in loader for text in targets_of(batch, processor.tokenizer)]
    assert sorted(learned) == sorted(caption(i) + "<|eot_id|>" for i in range(6))


def test_chat_messages_with_image_parts_and_an_images_column(processor, tmp_path):
    image = {"bytes": png_bytes(), "path": None}
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption(7)}]},
    ]
    Dataset.from_dict(
        {"messages": [messages], "images": [[image]]},
        features=Features(
            {
                "messages": List(
                    {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
                ),
                "images": List(Image()),
            }
        ),
    ).to_parquet(tmp_path / "sft.parquet")
    batch = next(iter(build_train_dataloader(config(str(tmp_path / "sft.parquet")), processor, SEQ_LEN)))
    targets = batch["input_ids"][batch["labels"] != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(targets) == caption(7) + "<|eot_id|>"
    assert batch["pixel_values"].shape[0] == 1


def test_unknown_columns_raise_naming_them(processor, tmp_path):
    Dataset.from_dict({"foo": ["x"]}).to_parquet(tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match=r"cannot tell the sample format from the columns \['foo'\]"):
        build_train_dataloader(config(str(tmp_path / "odd.parquet")), processor, SEQ_LEN)


# Bad data


def bad_and_good_examples():
    """(text, images, expected skip reason or None) covering every bad kind, among good examples."""
    good_png = png_bytes()
    jpeg, png = jpeg_bytes(), png_bytes(64, 64)
    wide = io.BytesIO()
    PILImage.new("RGB", (10_000, 20)).save(wide, format="PNG")
    bad_images = [
        jpeg[: len(jpeg) // 2],  # truncated JPEG
        png[: len(png) // 2],  # truncated PNG
        b"",
        np.random.default_rng(1).bytes(500),
        b"<!DOCTYPE html><html><body>Not Found</body></html>",
        png_declaring(40_000, 40_000),
        wide.getvalue(),  # aspect ratio 500
    ]
    examples = [(IMAGE_TOKEN + caption(i), [good_png], None) for i in range(10)]
    examples += [(IMAGE_TOKEN + "bad image", [image], "invalid_image") for image in bad_images]
    examples.append((IMAGE_TOKEN + "a url", ["https://example.com/cat.jpg"], "invalid_image"))
    examples.append((IMAGE_TOKEN + IMAGE_TOKEN + "two placeholders", [good_png], "placeholder_mismatch"))
    examples.append((IMAGE_TOKEN + " long" * 200, [good_png], "too_long"))
    examples.append((IMAGE_TOKEN * 3 + "three images", [good_png] * 3, "too_many_images"))
    examples.append((IMAGE_TOKEN + "   ", [good_png], "empty_text"))
    order = np.random.default_rng(2).permutation(len(examples))
    return [examples[i] for i in order]


def image_value(image: bytes | str) -> dict:
    """How `datasets` stores an image: encoded bytes, or a path (here a URL) to read them from."""
    return {"bytes": None, "path": image} if isinstance(image, str) else {"bytes": image, "path": None}


def bad_data_parquet(tmp_path) -> tuple[str, list]:
    examples = bad_and_good_examples()
    # Written with pyarrow: `datasets` would try to measure the URL's size over the network.
    table = pa.Table.from_pydict(
        {
            "text": [text for text, _, _ in examples],
            "images": [[image_value(image) for image in images] for _, images, _ in examples],
        }
    )
    pq.write_table(table, tmp_path / "mixed.parquet")
    return str(tmp_path / "mixed.parquet"), examples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_examples_are_skipped_and_counted_exactly_and_all_good_ones_arrive(processor, tmp_path, num_workers):
    path, examples = bad_data_parquet(tmp_path)
    loader = build_train_dataloader(config(path, max_images_per_batch=2, num_workers=num_workers), processor, SEQ_LEN)
    arrived = read_all(loader, processor.tokenizer)
    expected_counts = {}
    for _, _, reason in examples:
        if reason:
            expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert sorted(arrived) == sorted(caption(i) for i in range(10))
    assert dict(loader.skipped) == expected_counts


def test_strict_mode_raises_on_the_first_bad_example_naming_it(processor, tmp_path):
    path, examples = bad_data_parquet(tmp_path)
    first_bad = next(i for i, (_, _, reason) in enumerate(examples) if reason)
    loader = build_train_dataloader(
        config(path, max_images_per_batch=2, shuffle=False, strict=True), processor, SEQ_LEN
    )
    with pytest.raises(BadSampleError, match=rf"train example {first_bad}: {examples[first_bad][2]}"):
        list(loader)


# Sharding and workers


def test_ranks_read_disjoint_shares_that_cover_the_data(processor, tmp_path):
    path = captions_parquet(tmp_path, 15)
    shares = [
        read_all(build_train_dataloader(config(path), processor, SEQ_LEN, rank, 2), processor.tokenizer)
        for rank in (0, 1)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(caption(i) for i in range(15))


def test_streamed_ranks_and_workers_each_read_a_disjoint_share(processor, tmp_path):
    path = captions_parquet(tmp_path, 20)
    shares = [
        read_all(
            build_train_dataloader(config(path, streaming=True, num_workers=2), processor, SEQ_LEN, rank, 2),
            processor.tokenizer,
        )
        for rank in (0, 1)
    ]
    assert sorted(shares[0] + shares[1]) == sorted(caption(i) for i in range(20))


def test_batches_keep_to_rows_seq_len_and_image_budget(processor):
    loader = build_train_dataloader(
        config(dataset="scenes", scenes_size=120, max_images_per_batch=6), processor, SEQ_LEN
    )
    for batch in loader:
        assert batch["input_ids"].shape[0] <= 2 and batch["input_ids"].shape[1] == SEQ_LEN
        assert batch["pixel_values"].shape[0] <= 6
        assert loader.last_stats.images == batch["pixel_values"].shape[0]


# Exact resume


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)


def find_key(state, key):
    """Every value under `key` anywhere in a nested state."""
    if isinstance(state, dict):
        return ([state[key]] if key in state else []) + [v for value in state.values() for v in find_key(value, key)]
    return []


def resume_matches_uninterrupted(make_loader, read_before: int, read_after: int):
    uninterrupted = iter(make_loader())
    expected = [next(uninterrupted) for _ in range(read_before + read_after)][read_before:]
    first = make_loader()
    batches = iter(first)
    for _ in range(read_before):
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    resumed = make_loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    assert_same_batches([next(batches) for _ in range(read_after)], expected)
    return state, resumed


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_of_an_uninterrupted_run(processor, num_workers):
    data = DataConfig(scenes_size=400, rows_per_batch=2, max_images_per_batch=8, num_workers=num_workers)
    state, _ = resume_matches_uninterrupted(partial(build_train_dataloader, data, processor, SEQ_LEN), 5, 4)
    assert any(find_key(state, "buffered")), "the checkpoint should fall while samples wait in a buffer"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_of_a_stream_with_bad_examples_gives_the_same_batches_and_counts(processor, tmp_path, num_workers):
    path, _ = bad_data_parquet(tmp_path)
    data = config(path, streaming=True, num_epochs=None, max_images_per_batch=2, num_workers=num_workers)
    make = partial(build_train_dataloader, data, processor, SEQ_LEN)
    _, resumed = resume_matches_uninterrupted(make, 3, 12)
    uninterrupted = make()
    batches = iter(uninterrupted)
    for _ in range(15):
        next(batches)
    assert resumed.skipped == uninterrupted.skipped and sum(resumed.skipped.values()) > 0
    assert resumed.samples_seen == uninterrupted.samples_seen


def test_resume_with_other_num_workers_is_refused_with_a_clear_error(processor):
    loader = build_train_dataloader(DataConfig(scenes_size=50, num_workers=0), processor, SEQ_LEN)
    next(iter(loader))
    other = build_train_dataloader(DataConfig(scenes_size=50, num_workers=2), processor, SEQ_LEN)
    with pytest.raises(ValueError, match="num_workers 0 -> 2"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("read_between", [0, 1])
def test_a_second_resume_soon_after_the_first_still_continues_exactly(processor, num_workers, read_between):
    # A restored worker's state must be right before it has yielded anything, and move on once it has.
    data = DataConfig(scenes_size=400, rows_per_batch=2, max_images_per_batch=8, num_workers=num_workers)
    make = partial(build_train_dataloader, data, processor, SEQ_LEN)
    uninterrupted = iter(make())
    expected = [next(uninterrupted) for _ in range(5 + 2 * read_between + 4)][5 + 2 * read_between :]
    loader = make()
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.state_dict()
    for _ in range(2):
        loader = make()
        loader.load_state_dict(json.loads(json.dumps(state)))
        batches = iter(loader)
        for _ in range(read_between):
            next(batches)
        state = loader.state_dict()
    assert_same_batches([next(batches) for _ in range(4)], expected)


def test_skips_of_a_worker_that_never_fills_a_batch_are_counted(processor, tmp_path):
    # Unshuffled, worker 1 reads the odd examples, all bad: its counts can only arrive after its last (no) batch.
    table = pa.Table.from_pydict(
        {"jpg": [png_bytes(), b"broken", png_bytes(), b""], "txt": [caption(i) for i in range(4)]}
    )
    pq.write_table(table, tmp_path / "tail.parquet")
    data = config(str(tmp_path / "tail.parquet"), shuffle=False, num_workers=2)
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    assert sorted(read_all(loader, processor.tokenizer)) == [caption(0), caption(2)]
    assert dict(loader.skipped) == {"invalid_image": 2}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unshuffled_rank_r_of_w_reads_the_rows_r_r_plus_w_and_so_on_each_epoch(processor, tmp_path, num_workers):
    # Benchmarks rely on this: without shuffle, which rows a rank trains on depends only on its rank.
    rows, world_size, epochs = 20, 3, 2
    path = captions_parquet(tmp_path, rows)
    for rank in range(world_size):
        data = config(path, shuffle=False, num_epochs=epochs, num_workers=num_workers)
        loader = build_train_dataloader(data, processor, SEQ_LEN, rank, world_size)
        ids = []
        for batch in loader:
            assert samples_of(batch, processor.tokenizer) == [caption(i) for i in loader.last_sample_ids]
            ids += loader.last_sample_ids
        assert sorted(ids) == sorted(list(range(rank, rows, world_size)) * epochs)
