"""The packing collator places every possible sample whole, isolated, with its images, and counts the rest."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from processing.collator import (
    IGNORE_INDEX,
    TOO_LONG,
    TOO_MANY_IMAGES,
    MultimodalPackingCollator,
    pack_samples,
)
from processing.data.packing import PackingBuffer
from processing.tokenizer import IMAGE_TOKEN

PAD = 0
D = 12  # values per patch of the synthetic images
TOKEN_BLOCK = 1000  # token ids of sample i are 1000 * (i + 1) + position, so every token names its sample


def make_sample(index: int, length: int, patch_counts: list[int], padded_patches: int = 0) -> dict:
    """A processor-like sample whose tokens, labels and pixels each say which sample (and image) they belong to."""
    input_ids = torch.arange(length) + TOKEN_BLOCK * (index + 1)
    sample = {"input_ids": input_ids[None], "labels": (input_ids + 7)[None]}
    if patch_counts:
        L = max(patch_counts) + padded_patches
        pixel_values = torch.full((len(patch_counts), L, D), -5.0)  # padding patches hold junk on purpose
        mask = torch.zeros((len(patch_counts), L), dtype=torch.int32)
        for j, count in enumerate(patch_counts):
            pixel_values[j, :count] = image_value(index, j)
            mask[j, :count] = 1
        sample["pixel_values"] = pixel_values
        sample["pixel_attention_mask"] = mask
        sample["spatial_shapes"] = torch.tensor([[1, count] for count in patch_counts])
    return sample


def image_value(sample_index: int, image_index: int) -> float:
    return sample_index * 10 + image_index + 1


@st.composite
def packing_cases(draw):
    """Samples of random lengths and image counts, some impossible, with the possible ones within the budget and at
    least one of them (a batch of none raises; see the tests of dropped batches)."""
    seq_len = draw(st.integers(4, 48))
    max_images = draw(st.one_of(st.none(), st.integers(0, 5)))
    budget_left = math.inf if max_images is None else max_images
    samples, expected_skips = [], {}
    for index in range(draw(st.integers(0, 12))):
        length = draw(st.integers(1, seq_len + 6))
        images = draw(st.integers(0, 3 if max_images is None else max_images + 2))
        if length > seq_len:
            expected_skips[index] = TOO_LONG
        elif max_images is not None and images > max_images:
            expected_skips[index] = TOO_MANY_IMAGES
        else:
            images = min(images, budget_left)
            budget_left -= images
        patch_counts = [draw(st.integers(1, 6)) for _ in range(images)]
        samples.append(make_sample(index, length, patch_counts, padded_patches=draw(st.integers(0, 3))))
    if len(expected_skips) == len(samples):
        samples.append(make_sample(len(samples), draw(st.integers(1, seq_len)), []))
    return seq_len, max_images, samples, expected_skips


def collate(seq_len, max_images, samples):
    collator = MultimodalPackingCollator(seq_len, pad_token_id=PAD, max_images=max_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning on dropped samples has tests of its own
        return collator, collator(samples)


def runs_of_samples(batch) -> list[tuple[int, int, int, int]]:
    """(sample index, row, start, end) of every contiguous run of one sample's tokens, in token order."""
    runs = []
    for r, row in enumerate(batch["input_ids"].tolist()):
        start = 0
        while start < len(row):
            owner = row[start] // TOKEN_BLOCK - 1
            end = start
            while end < len(row) and row[end] // TOKEN_BLOCK - 1 == owner and row[end] != PAD:
                end += 1
            if owner >= 0:
                runs.append((owner, r, start, end))
            start = max(end, start + 1)
    return runs


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_every_possible_sample_appears_once_whole_with_restarting_positions(case):
    seq_len, max_images, samples, expected_skips = case
    _, batch = collate(seq_len, max_images, samples)
    runs = runs_of_samples(batch)
    placed = sorted(owner for owner, *_ in runs)
    assert placed == [i for i in range(len(samples)) if i not in expected_skips]
    for owner, r, start, end in runs:
        assert batch["input_ids"][r, start:end].tolist() == samples[owner]["input_ids"][0].tolist()
        assert batch["position_ids"][r, start:end].tolist() == list(range(end - start))


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_images_are_concatenated_in_the_order_of_their_samples_tokens(case):
    seq_len, max_images, samples, _ = case
    _, batch = collate(seq_len, max_images, samples)
    expected_values, expected_shapes = [], []
    for owner, *_ in runs_of_samples(batch):
        for j, shape in enumerate(samples[owner].get("spatial_shapes", torch.empty(0, 2)).tolist()):
            expected_values.append(image_value(owner, j))
            expected_shapes.append(shape)
    if not expected_values:
        assert "pixel_values" not in batch
        return
    first_patch_values = batch["pixel_values"][:, 0, 0].tolist()
    assert first_patch_values == expected_values
    assert batch["spatial_shapes"].tolist() == expected_shapes
    valid_patches = batch["pixel_attention_mask"].sum(dim=1).tolist()
    assert valid_patches == [h * w for h, w in expected_shapes]


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_rows_hold_at_most_seq_len_and_are_padded_with_pad_id_and_ignored_labels(case):
    seq_len, max_images, samples, _ = case
    _, batch = collate(seq_len, max_images, samples)
    assert batch["input_ids"].shape[1] == seq_len
    padding = batch["input_ids"] == PAD
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    real_tokens = sum(end - start for _, _, start, end in runs_of_samples(batch))
    assert real_tokens == int((~padding).sum())


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_first_label_of_every_sample_is_ignored_and_the_rest_are_kept(case):
    seq_len, max_images, samples, _ = case
    _, batch = collate(seq_len, max_images, samples)
    for owner, r, start, end in runs_of_samples(batch):
        expected = [IGNORE_INDEX] + samples[owner]["labels"][0, 1:].tolist()
        assert batch["labels"][r, start:end].tolist() == expected


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_skipped_samples_are_exactly_the_impossible_ones_counted_by_reason(case):
    seq_len, max_images, samples, expected_skips = case
    collator, _ = collate(seq_len, max_images, samples)
    expected = {}
    for reason in expected_skips.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(collator.skipped) == expected


@settings(max_examples=80, deadline=None)
@given(packing_cases())
def test_images_per_batch_stay_within_the_budget(case):
    seq_len, max_images, samples, _ = case
    collator, batch = collate(seq_len, max_images, samples)
    images = 0 if "pixel_values" not in batch else batch["pixel_values"].shape[0]
    assert max_images is None or images <= max_images
    assert collator.last_stats.images == images


def reference_best_fit_decreasing(lengths, seq_len):
    """The textbook algorithm, quadratic and obvious: longest first, into the fullest row it fits."""
    rows, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = [r for r in range(len(rows)) if loads[r] + lengths[i] <= seq_len]
        if fitting:
            r = min(fitting, key=lambda r: (seq_len - loads[r], r))
        else:
            rows.append([])
            loads.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        loads[r] += lengths[i]
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), max_size=60), st.integers(100, 300))
def test_packing_equals_textbook_best_fit_decreasing(lengths, seq_len):
    assert pack_samples(lengths, seq_len).rows == reference_best_fit_decreasing(lengths, seq_len)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), max_size=60), st.integers(100, 300))
def test_no_two_rows_could_be_merged_into_one(lengths, seq_len):
    # A row is only opened for a sample that fits no open row, so any two rows together overflow seq_len.
    loads = [sum(lengths[i] for i in row) for row in pack_samples(lengths, seq_len).rows]
    assert all(a + b > seq_len for i, a in enumerate(loads) for b in loads[i + 1 :])


def test_best_fit_puts_a_sample_in_the_row_it_fills_most_tightly():
    # After 70 | 50+40, a sample of 10 goes where 10 tokens are left, not where 30 are (first fit would).
    plan = pack_samples([70, 50, 40, 10], seq_len=100)
    assert plan.rows == [[0], [1, 2, 3]]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), max_size=40),
    st.integers(1, 6),
    st.integers(0, 8),
    st.integers(20, 40),
)
def test_bounded_packing_accounts_for_every_sample_within_rows_and_image_budget(items, max_rows, max_images, seq_len):
    lengths, images = [length for length, _ in items], [count for _, count in items]
    plan = pack_samples(lengths, seq_len, images, max_images=max_images, max_rows=max_rows)
    placed = [i for row in plan.rows for i in row]
    assert sorted(placed + plan.unplaced + list(plan.skipped)) == list(range(len(items)))
    assert len(plan.rows) <= max_rows
    assert all(sum(lengths[i] for i in row) <= seq_len for row in plan.rows)
    assert sum(images[i] for i in placed) <= max_images


def test_higher_priority_samples_are_placed_before_longer_ones():
    plan = pack_samples([10, 30, 30], seq_len=40, max_rows=1, priorities=[1, 0, 0])
    assert plan.rows == [[0, 1]] and plan.unplaced == [2]


def test_possible_samples_over_the_image_budget_together_raise_naming_them():
    samples = [make_sample(0, 8, [2, 2]), make_sample(1, 8, [2])]
    collator = MultimodalPackingCollator(64, pad_token_id=PAD, max_images=2)
    with pytest.raises(ValueError, match=r"samples \[0, 1\] carry 3 images"):
        collator(samples)


def test_batch_has_position_ids_and_no_attention_mask():
    batch = MultimodalPackingCollator(16, pad_token_id=PAD)([make_sample(0, 5, [3])])
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
        "pixel_values",
        "pixel_attention_mask",
        "spatial_shapes",
    }


def test_text_only_batch_has_no_pixel_keys():
    batch = MultimodalPackingCollator(16, pad_token_id=PAD)([make_sample(0, 5, [])])
    assert set(batch) == {"input_ids", "labels", "position_ids"}


def test_image_tensors_have_the_agreed_dtypes():
    batch = MultimodalPackingCollator(16, pad_token_id=PAD)([make_sample(0, 5, [3])])
    dtypes = (batch["pixel_values"].dtype, batch["pixel_attention_mask"].dtype, batch["spatial_shapes"].dtype)
    assert dtypes == (torch.float32, torch.int32, torch.int64)


def test_padding_patches_are_cut_to_the_longest_image_of_the_batch():
    samples = [make_sample(0, 4, [3], padded_patches=10), make_sample(1, 4, [5], padded_patches=2)]
    batch = MultimodalPackingCollator(16, pad_token_id=PAD)(samples)
    assert batch["pixel_values"].shape == (2, 5, D)
    assert batch["pixel_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_a_sample_with_or_without_the_leading_batch_dimension_collates_the_same():
    sample = make_sample(0, 6, [2])
    flat = {key: value[0] if key in ("input_ids", "labels") else value for key, value in sample.items()}
    collator = MultimodalPackingCollator(16, pad_token_id=PAD)
    with_dim, without_dim = collator([sample]), collator([flat])
    assert all(torch.equal(with_dim[key], without_dim[key]) for key in with_dim)


def test_attention_mask_padding_of_a_sample_is_dropped():
    sample = make_sample(0, 4, [])
    sample["input_ids"] = torch.cat([sample["input_ids"], torch.full((1, 3), PAD)], dim=1)
    sample["labels"] = torch.cat([sample["labels"], torch.full((1, 3), IGNORE_INDEX)], dim=1)
    sample["attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    collator = MultimodalPackingCollator(16, pad_token_id=PAD)
    collator([sample])
    assert collator.last_stats.real_tokens == 4


def test_without_labels_image_and_pad_tokens_are_never_targets():
    image_token, boi = 5, 6
    sample = {"input_ids": torch.tensor([[1, 6, 5, 5, 9, 10]])}
    batch = MultimodalPackingCollator(8, pad_token_id=PAD, ignore_token_ids=(image_token, boi))([sample])
    assert batch["labels"][0, :6].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9, 10]


def test_stats_report_token_efficiency_and_image_slot_use():
    collator = MultimodalPackingCollator(10, pad_token_id=PAD, max_images=4)
    collator([make_sample(0, 6, [1]), make_sample(1, 7, [1])])
    stats = collator.last_stats
    assert (stats.rows, stats.efficiency, stats.image_slot_use) == (2, 13 / 20, 2 / 4)


def test_padding_restarts_positions_so_it_is_a_sequence_of_its_own():
    batch = MultimodalPackingCollator(6, pad_token_id=PAD)([make_sample(0, 4, [])])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]


def test_malformed_sample_error_names_the_sample():
    samples = [make_sample(0, 3, []), {"input_ids": torch.zeros(2, 3, dtype=torch.long)}]
    with pytest.raises(ValueError, match="sample 1: input_ids has shape"):
        MultimodalPackingCollator(8, pad_token_id=PAD)(samples)


def stream_through_buffer(items, seq_len, rows, max_images, max_wait=4):
    """Feed (length, images) items through a PackingBuffer as the pipeline does; return the batches of keys."""
    buffer = PackingBuffer(seq_len, rows, max_images=max_images, max_wait=max_wait)
    batches = []
    for key, (length, images) in enumerate(items):
        buffer.add(key, length, images)
        while buffer.ready():
            batches.append(buffer.take())
    while len(buffer):
        batches.append(buffer.take())
    return [[[sample.key for sample in row] for row in batch] for batch in batches]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 2)), max_size=80), st.integers(1, 4))
def test_packing_buffer_hands_out_every_sample_exactly_once(items, rows):
    batches = stream_through_buffer(items, seq_len=30, rows=rows, max_images=3)
    keys = [key for batch in batches for row in batch for key in row]
    assert sorted(keys) == list(range(len(items)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 2)), max_size=80), st.integers(1, 4))
def test_packing_buffer_batches_keep_to_rows_seq_len_and_image_budget(items, rows):
    for batch in stream_through_buffer(items, seq_len=30, rows=rows, max_images=3):
        assert 1 <= len(batch) <= rows
        assert all(sum(items[key][0] for key in row) <= 30 for row in batch)
        assert sum(items[key][1] for row in batch for key in row) <= 3


def test_a_sample_that_waited_max_wait_batches_goes_next():
    # Longer 11-token samples keep arriving and go first, leaving 9 tokens free in each row of 20: the 10-token
    # sample never fits beside them, so only ageing lets it out.
    items = [(10, 0)] + [(11, 0)] * 60
    batches = stream_through_buffer(items, seq_len=20, rows=1, max_images=None, max_wait=3)
    first_batch_with_it = next(i for i, batch in enumerate(batches) if 0 in batch[0])
    assert first_batch_with_it == 3


def test_packing_buffer_fills_rows_to_97_percent_on_caption_like_lengths():
    # 64-256 image tokens plus 8-80 text tokens per sample, rows of 2048 (acceptance: >= 97 %).
    rng = np.random.default_rng(0)
    lengths = (rng.integers(64, 257, 3000) + rng.integers(8, 81, 3000)).tolist()
    batches = stream_through_buffer([(n, 1) for n in lengths], seq_len=2048, rows=8, max_images=None)
    rows = sum(len(batch) for batch in batches)
    assert sum(lengths) / (rows * 2048) >= 0.97


def tiny_model_and_processor(attn_implementation: str = "sdpa"):
    from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration
    from processing import Llama3Siglip2ImageProcessor, Llama3Siglip2Processor, build_byte_level_bpe_tokenizer
    from processing.scenes import COLOUR_NAMES, scene_caption

    tokenizer = build_byte_level_bpe_tokenizer([scene_caption(a, b) for a in COLOUR_NAMES for b in COLOUR_NAMES], 300)
    image_processor = Llama3Siglip2ImageProcessor(patch_size=4, merge_size=2, max_patches=64)
    processor = Llama3Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Llama3Siglip2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 4,
            "num_patches": 64,
        },
        spatial_merge_size=2,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return Llama3Siglip2ForConditionalGeneration(config).eval(), processor


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_sample_run_alone(attn_implementation):
    from processing.scenes import ScenesSource

    model, processor = tiny_model_and_processor(attn_implementation)
    source = ScenesSource("train", 10, interleaved_share=0.5)
    samples = [processor.process_sample(source[i]["text"], source[i]["images"]) for i in range(4)]
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    # One row with room to spare: best-fit puts all four there, in order, followed by padding.
    batch = MultimodalPackingCollator.from_processor(processor, seq_len=sum(lengths) + 5)(samples)
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] > 4
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        start = 0
        for sample, length in zip(samples, lengths):
            alone = model(**{k: v for k, v in sample.items() if k != "labels"}, use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-5)
            start += length


# Used on its own (e.g. with transformers' Trainer): dropped samples are said, counted, and never leave an empty batch


def test_a_sample_longer_than_seq_len_is_dropped_with_a_warning_the_first_time_and_counted():
    collator = MultimodalPackingCollator(16, pad_token_id=PAD)
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 samples of a batch as too_long \(sample 1: 20 tokens, over "
                      r"seq_len 16\); raise seq_len, or pass truncation=True"):
        batch = collator([make_sample(0, 5, []), make_sample(1, 20, [])])
    assert batch["input_ids"].shape == (1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time, only counted
        collator([make_sample(0, 5, []), make_sample(1, 30, [])])
    assert collator.skipped == {TOO_LONG: 2}


@pytest.mark.parametrize(
    "samples, message",
    [
        ([make_sample(0, 20, []), make_sample(1, 17, [1])], r"sample 0: 20 tokens, over seq_len 16; sample 1: 17"),
        ([make_sample(0, 4, [1, 1, 1])], r"sample 0: 3 images, over max_images 2"),
        ([], r"the batch is empty"),
    ],
    ids=["too-long", "too-many-images", "no-samples"],
)
def test_a_batch_whose_samples_are_all_dropped_raises_naming_them_instead_of_being_empty(samples, message):
    collator = MultimodalPackingCollator(16, pad_token_id=PAD, max_images=2)
    with pytest.raises(ValueError, match=rf"no sample of the batch can be packed \({message}.*truncation=True"):
        collator(samples)


# Truncation (opt-in): cut to seq_len and the image budget, never inside an image's tokens

BOI, EOI, IMAGE = 1, 2, 3


def sample_with_image_tokens(index: int, pieces: list) -> dict:
    """A processor-like sample from pieces: an int is that many text tokens, ("image", n) an image of n tokens
    (boi, n image tokens, eoi; labels -100) and n patches whose values name the sample and the image."""
    ids, labels, patch_counts = [], [], []
    for piece in pieces:
        if isinstance(piece, int):
            text = [TOKEN_BLOCK * (index + 1) + len(ids) + i for i in range(piece)]
            ids, labels = ids + text, labels + text
        else:
            n = piece[1]
            ids += [BOI] + [IMAGE] * n + [EOI]
            labels += [IGNORE_INDEX] * (n + 2)
            patch_counts.append(n)
    sample = make_sample(index, len(ids), patch_counts)
    sample["input_ids"], sample["labels"] = torch.tensor([ids]), torch.tensor([labels])
    return sample


def truncating_collator(seq_len: int, max_images: int | None = None) -> MultimodalPackingCollator:
    return MultimodalPackingCollator(
        seq_len, pad_token_id=PAD, max_images=max_images, truncation=True, boi_token_id=BOI, eoi_token_id=EOI
    )


def collate_quietly(collator, samples):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collator(samples)


def segments(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample in a batch, found by its positions restarting at 0 (padding left out)."""
    found = []
    for r, (ids, positions) in enumerate(zip(batch["input_ids"].tolist(), batch["position_ids"].tolist())):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        found += [(r, start, end) for start, end in zip(starts, starts[1:]) if ids[start] != PAD]
    return found


def image_token_counts(ids: list[int]) -> list[int]:
    """The number of image tokens between each boi and its eoi, in order."""
    counts, inside = [], False
    for token in ids:
        if token == BOI:
            counts.append(0)
            inside = True
        elif token == EOI:
            inside = False
        elif inside:
            assert token == IMAGE
            counts[-1] += 1
    return counts


@st.composite
def truncation_cases(draw):
    """Samples that start with at least two text tokens (so a cut always leaves something to learn) followed by
    text runs and images, some longer than seq_len."""
    seq_len = draw(st.integers(4, 40))
    samples = []
    for index in range(draw(st.integers(1, 6))):
        pieces = [draw(st.integers(2, 6))]
        for _ in range(draw(st.integers(0, 4))):
            pieces.append(draw(st.one_of(st.integers(1, 8), st.tuples(st.just("image"), st.integers(1, 12)))))
        samples.append(sample_with_image_tokens(index, pieces))
    return seq_len, samples


@settings(max_examples=150, deadline=None)
@given(truncation_cases())
def test_truncation_keeps_every_sample_as_a_prefix_that_never_cuts_an_image(case):
    seq_len, samples = case
    collator = truncating_collator(seq_len)
    batch = collate_quietly(collator, samples)
    assert not collator.skipped
    expected_images = []
    for r, start, end in segments(batch):
        owner = batch["input_ids"][r, start].item() // TOKEN_BLOCK - 1
        original_ids, original_labels = samples[owner]["input_ids"][0], samples[owner]["labels"][0]
        assert end - start <= seq_len
        assert batch["input_ids"][r, start:end].tolist() == original_ids[: end - start].tolist()
        assert batch["labels"][r, start + 1 : end].tolist() == original_labels[1 : end - start].tolist()
        kept = batch["input_ids"][r, start:end].tolist()
        assert kept.count(BOI) == kept.count(EOI)  # every image kept whole, boi to eoi
        expected_images += [(image_value(owner, j), n) for j, n in enumerate(image_token_counts(kept))]
    got = [] if "pixel_values" not in batch else list(
        zip(batch["pixel_values"][:, 0, 0].tolist(), batch["pixel_attention_mask"].sum(1).tolist())
    )
    assert got == expected_images  # each image's patches still match its tokens, in order
    assert sum(collator.truncated.values()) == sum(s["input_ids"].shape[1] > seq_len for s in samples)


def test_truncation_cuts_before_an_image_that_does_not_fit_whole():
    collator = truncating_collator(seq_len=12)
    sample = sample_with_image_tokens(0, [3, ("image", 2), 2, ("image", 4), 5])  # image 2 spans tokens 9..14
    with pytest.warns(UserWarning, match=r"truncated sample 0 \(20 tokens, over seq_len 12\) to 9 tokens and 1 image"):
        batch = collator([sample])
    assert batch["input_ids"][0, :9].tolist() == sample["input_ids"][0, :9].tolist()
    assert batch["input_ids"][0, 9:].tolist() == [PAD] * 3
    assert batch["pixel_values"].shape[0] == 1 and collator.truncated == {TOO_LONG: 1}


def test_truncation_keeps_the_first_images_within_max_images():
    sample = sample_with_image_tokens(0, [2, ("image", 1), 1, ("image", 1), 1, ("image", 1), 1])
    batch = collate_quietly(truncating_collator(seq_len=64, max_images=2), [sample])
    assert batch["input_ids"][0].tolist().count(BOI) == 2 and batch["pixel_values"].shape[0] == 2


def test_truncation_drops_a_sample_left_with_nothing_to_learn_and_says_why():
    # Cut before its image, only the first token (never a target) would remain.
    samples = [sample_with_image_tokens(0, [1, ("image", 20), 3]), sample_with_image_tokens(1, [4])]
    collator = truncating_collator(seq_len=16)
    with pytest.warns(UserWarning, match=r"sample 0: 26 tokens, over seq_len 16; cut to fit, it has nothing to learn"):
        collator(samples)
    assert collator.skipped == {TOO_LONG: 1}


def test_truncation_of_samples_with_images_needs_the_image_delimiters():
    collator = MultimodalPackingCollator(8, pad_token_id=PAD, truncation=True)
    with pytest.raises(ValueError, match="needs boi_token_id and eoi_token_id.*from_processor"):
        collator([sample_with_image_tokens(0, [4, ("image", 6)])])


def test_a_truncated_batch_of_real_photos_runs_through_the_model():
    # The model scatters each image's features into its tokens: a cut inside an image would fail there.
    from skimage import data

    model, processor = tiny_model_and_processor()
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    text = "a red box and a blue box " * 3
    samples = [processor.process_sample(text + IMAGE_TOKEN + text + IMAGE_TOKEN + text, photos[:2]),
               processor.process_sample(IMAGE_TOKEN + text, photos[2:])]
    second_image_start = (samples[0]["input_ids"][0] == processor.boi_token_id).nonzero()[1].item()
    seq_len = second_image_start + 3  # the first sample's second image no longer fits whole
    collator = MultimodalPackingCollator.from_processor(processor, seq_len=seq_len, truncation=True)
    batch = collate_quietly(collator, samples)
    assert collator.truncated == {TOO_LONG: 1} and batch["pixel_values"].shape[0] == 2
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
    assert torch.isfinite(loss)
