"""Sample ids, resume on another layout, and data sets that yield nothing: each sample of an epoch is delivered
exactly once whatever the ranks and workers before and after a checkpoint, and a data set of bad examples raises
rather than hanging. Ranks are simulated in one process, one loader per rank."""

import json
import signal
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing.data import DataConfig, DataSourceError, build_train_dataloader
from processing.data.sources import Deal, ReaderProgress, redeal
from processing.data.stream import NoUsableSamplesError
from tests.test_data import (
    SEQ_LEN,
    caption,
    captions_parquet,
    chat_jsonl,
    config,
    find_key,
    png_bytes,
    samples_of,
    tiny_processor,
)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def scenes(size: int, **overrides) -> DataConfig:
    return DataConfig(
        **{"scenes_size": size, "rows_per_batch": 2, "max_images_per_batch": 8, "num_epochs": 1, **overrides}
    )


def saved(loader) -> dict:
    return json.loads(json.dumps(loader.state_dict()))  # what a checkpoint keeps


def build_ranks(data: DataConfig, processor, world_size: int, states: list[dict] | None = None) -> list:
    loaders = [build_train_dataloader(data, processor, SEQ_LEN, rank, world_size) for rank in range(world_size)]
    for loader in loaders if states is not None else []:
        loader.load_state_dicts(states)
    return loaders


def train_steps(loaders, steps: int | None) -> list[list[int]]:
    """The sample ids of each step, all ranks together in rank order; `steps=None` runs every rank to its end.
    The iterators are kept on the loaders, as a trainer keeps them, so that `state_dict` sees what was taken;
    `ended` marks a loader whose data has run out."""
    for loader in loaders:
        if not hasattr(loader, "running"):
            loader.running, loader.ended = iter(loader), False
    per_step = []
    while steps is None or len(per_step) < steps:
        step = []
        for loader in loaders:
            if next(loader.running, None) is None:
                loader.ended = True
            else:
                step += loader.last_sample_ids
        if steps is None and not step:
            return per_step
        per_step.append(step)
    return per_step


def buffered_somewhere(states: list[dict]) -> bool:
    return any(buffered for state in states for buffered in find_key(state, "buffered"))


def delivered(per_step: list[list[int]]) -> list[int]:
    return [sample_id for step in per_step for sample_id in step]


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the data pipeline hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Sample ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sample_ids_name_the_samples_of_each_batch_in_row_order(processor, tmp_path, num_workers):
    data = config(captions_parquet(tmp_path, 24), num_workers=num_workers)
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    seen = []
    for batch in loader:
        assert samples_of(batch, processor.tokenizer) == [caption(i) for i in loader.last_sample_ids]
        seen += loader.last_sample_ids
    assert sorted(seen) == list(range(24))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sample_ids_per_step_are_the_same_after_a_resume_on_the_same_layout(processor, num_workers):
    data = scenes(400, num_epochs=None, num_workers=num_workers)
    expected = train_steps(build_ranks(data, processor, 2), 9)[5:]
    ranks = build_ranks(data, processor, 2)
    train_steps(ranks, 5)
    states = [saved(loader) for loader in ranks]
    assert buffered_somewhere(states), "the checkpoint should fall while samples wait in a buffer"
    assert train_steps(build_ranks(data, processor, 2, states), 4) == expected


def test_streamed_sample_ids_are_positions_in_the_stream(processor, tmp_path):
    data = config(captions_parquet(tmp_path, 20), streaming=True, num_workers=2)
    for rank in (0, 1):
        loader = build_train_dataloader(data, processor, SEQ_LEN, rank, 2)
        for batch in loader:
            assert samples_of(batch, processor.tokenizer) == [caption(i) for i in loader.last_sample_ids]


def test_the_first_skipped_example_of_each_reason_is_named(processor, tmp_path):
    table = pa.Table.from_pydict(
        {"jpg": [png_bytes(), b"broken", png_bytes(), png_bytes()], "txt": [caption(0), caption(1), "", caption(3)]}
    )
    pq.write_table(table, tmp_path / "two_bad.parquet")
    loader = build_train_dataloader(config(str(tmp_path / "two_bad.parquet"), num_workers=2), processor, SEQ_LEN)
    list(loader)
    assert set(loader.skip_examples) == {"invalid_image", "empty_text"}
    assert loader.skip_examples["invalid_image"].startswith("example 1: invalid_image: ")
    assert loader.skip_examples["empty_text"].startswith("example 2: empty_text: ")


# Resume on another layout


def resume_on_another_layout(processor, data, before: tuple[int, int], after: tuple[int, int], steps: int):
    """Train `steps` steps on `before` = (ranks, workers), save, then resume on `after` and run to the end; the ids
    delivered before and after, and the saved states."""
    ranks = build_ranks(DataConfig(**{**vars(data), "num_workers": before[1]}), processor, before[0])
    first = delivered(train_steps(ranks, steps))
    states = [saved(loader) for loader in ranks]
    del ranks  # their workers stop before the next ones start
    resumed = build_ranks(DataConfig(**{**vars(data), "num_workers": after[1]}), processor, after[0], states)
    return first, delivered(train_steps(resumed, None)), states


@pytest.mark.parametrize(
    "before, after",
    [((2, 0), (3, 0)), ((2, 0), (1, 0)), ((1, 0), (4, 0)), ((4, 0), (2, 0)), ((2, 2), (3, 0)), ((1, 0), (2, 2))],
)
def test_a_resume_on_another_layout_delivers_every_sample_of_the_epoch_exactly_once(processor, before, after):
    first, rest, states = resume_on_another_layout(processor, scenes(90), before, after, steps=2)
    assert buffered_somewhere(states), "the checkpoint should fall while samples wait in a buffer"
    assert sorted(first + rest) == list(range(90))


def test_samples_buffered_at_the_checkpoint_are_delivered_after_the_resume(processor, tmp_path):
    data = config(captions_parquet(tmp_path, 40))
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    first = delivered(train_steps([loader], 2))
    buffered = sorted(sample_id for _, sample_id in loader.stream._live.pending.values())
    assert buffered, "the checkpoint should fall while samples wait in the buffer"
    rest = delivered(train_steps(build_ranks(data, processor, 3, [saved(loader)]), None))
    assert set(buffered) <= set(rest) and not set(buffered) & set(first)
    assert sorted(first + rest) == list(range(40))


def test_ids_and_contents_agree_after_a_resume_on_another_layout(processor, tmp_path):
    data = config(captions_parquet(tmp_path, 30))
    ranks = build_ranks(data, processor, 2)
    train_steps(ranks, 1)
    for loader in build_ranks(data, processor, 3, [saved(loader) for loader in ranks]):
        for batch in loader:
            assert samples_of(batch, processor.tokenizer) == [caption(i) for i in loader.last_sample_ids]


def test_a_chain_of_layouts_over_two_epochs_delivers_every_sample_once_per_epoch(processor):
    # Re-dealing an already re-dealt epoch, and readers that cross into the next epoch before a checkpoint.
    data = scenes(80, num_epochs=2)
    ranks, ids = build_ranks(data, processor, 2), []
    for world_size, steps in ((3, 3), (1, 2), (4, 3), (2, 1)):
        ids += delivered(train_steps(ranks, steps))
        assert not any(loader.ended for loader in ranks)
        ranks = build_ranks(data, processor, world_size, [saved(loader) for loader in ranks])
    ids += delivered(train_steps(ranks, None))
    assert sorted(ids) == sorted(list(range(80)) * 2)


def test_a_resume_on_the_same_layout_after_a_redeal_continues_exactly(processor):
    data = scenes(120)
    ranks = build_ranks(data, processor, 2)
    train_steps(ranks, 2)
    states = [saved(loader) for loader in ranks]
    redealt = build_ranks(data, processor, 3, states)
    train_steps(redealt, 2)
    states_after = [saved(loader) for loader in redealt]
    expected = train_steps(redealt, 3)
    assert train_steps(build_ranks(data, processor, 3, states_after), 3) == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(8, 60),
    layouts=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4)), min_size=2, max_size=3),
    seed=st.integers(0, 3),
)
def test_any_save_points_and_world_sizes_deliver_each_sample_exactly_once(processor, size, layouts, seed):
    data = scenes(size, seed=seed)
    world_size, steps = layouts[0]
    ranks, ids = build_ranks(data, processor, world_size), []
    for next_world_size, next_steps in layouts[1:]:
        ids += delivered(train_steps(ranks, steps))
        if any(loader.ended for loader in ranks):
            break  # a trainer stops when a rank's data runs out; it saves no checkpoint after that
        ranks = build_ranks(data, processor, next_world_size, [saved(loader) for loader in ranks])
        steps = next_steps
    ids += delivered(train_steps(ranks, None))
    assert sorted(ids) == list(range(size))


def test_skip_counts_and_samples_seen_carry_over_to_the_new_rank_0(processor, tmp_path):
    table = pa.Table.from_pydict({"jpg": [png_bytes(), b"broken"] * 10, "txt": [caption(i) for i in range(20)]})
    pq.write_table(table, tmp_path / "half_bad.parquet")
    data = config(str(tmp_path / "half_bad.parquet"))
    ranks = build_ranks(data, processor, 2)
    train_steps(ranks, 2)
    states = [saved(loader) for loader in ranks]
    skipped = sum(sum(loader.skipped.values()) for loader in ranks)
    resumed = build_ranks(data, processor, 3, states)
    assert sum(resumed[0].skipped.values()) == skipped > 0 and not resumed[1].skipped
    assert resumed[0].samples_seen == sum(loader.samples_seen for loader in ranks)
    assert resumed[0].skip_examples["invalid_image"].startswith("example ")


def test_a_stream_resumed_on_another_world_size_is_refused_saying_why(processor, tmp_path):
    data = config(captions_parquet(tmp_path, 20), streaming=True, num_epochs=None)
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    train_steps([loader], 2)
    other = build_train_dataloader(data, processor, SEQ_LEN, 0, 2)
    with pytest.raises(ValueError, match=r"cannot be re-dealt.*Resume with 1 processes and num_workers 0"):
        other.load_state_dicts([saved(loader)])


def test_a_stream_resumed_on_the_same_world_size_continues_exactly(processor, tmp_path):
    data = config(captions_parquet(tmp_path, 20), streaming=True, num_epochs=None)
    expected = train_steps(build_ranks(data, processor, 2), 5)[2:]
    ranks = build_ranks(data, processor, 2)
    train_steps(ranks, 2)
    assert train_steps(build_ranks(data, processor, 2, [saved(loader) for loader in ranks]), 3) == expected


def test_a_single_state_on_another_layout_points_to_load_state_dicts(processor):
    loader = build_train_dataloader(scenes(50), processor, SEQ_LEN)
    train_steps([loader], 1)
    other = build_train_dataloader(scenes(50), processor, SEQ_LEN, 0, 2)
    with pytest.raises(ValueError, match=r"world_size 1 -> 2.*pass every rank's state to load_state_dicts"):
        other.load_state_dict(saved(loader))


def test_states_of_some_ranks_only_are_refused(processor):
    ranks = build_ranks(scenes(50), processor, 2)
    with pytest.raises(ValueError, match=r"expected the states of ranks 0..1 in order, got ranks \[1\]"):
        build_train_dataloader(scenes(50), processor, SEQ_LEN, 0, 3).load_state_dicts([saved(ranks[1])])


# State size


def test_a_redealt_state_of_a_million_samples_stays_small():
    """8 ranks x 4 workers, mid-epoch after ~2000 batches each: readers' cursors spread by a few hundred, each with
    50 samples buffered among its last 80 reads. The re-dealt deal is what every rank's state then carries."""
    size, readers, rng = 1_000_000, 32, np.random.default_rng(0)
    deal = Deal(size, readers, seed=0, shuffle=True)
    progress = [
        ReaderProgress(j, 0, 15_000 + int(rng.integers(-300, 300)), list(rng.permutation([True] * 30 + [False] * 50)))
        for j in range(readers)
    ]
    redealt = redeal(deal, progress, readers=24, num_epochs=None)
    size_once = len(json.dumps(redealt.state()))
    # A second re-deal of that epoch, after each new reader has read ~1000 more.
    again = [ReaderProgress(j, redealt.start, 1000 + int(rng.integers(-300, 300)), []) for j in range(24)]
    size_twice = len(json.dumps(redeal(redealt, again, readers=16, num_epochs=None).state()))
    print(f"re-dealt state of 1M samples: {size_once} bytes, after a second re-deal {size_twice} bytes")
    assert size_once < 16_000 and size_twice < 16_000


def test_a_loader_state_of_a_million_samples_stays_small(processor):
    loader = build_train_dataloader(scenes(1_000_000, num_epochs=None), processor, SEQ_LEN)
    train_steps([loader], 30)
    size = len(json.dumps(loader.state_dict()))
    print(f"loader state of 1M samples after 30 steps: {size} bytes")
    assert size < 4_000


# Data that yields nothing


def all_bad_parquet(tmp_path, count=40) -> str:
    table = pa.Table.from_pydict({"jpg": [b"broken"] * count, "txt": [caption(i) for i in range(count)]})
    pq.write_table(table, tmp_path / "all_bad.parquet")
    return str(tmp_path / "all_bad.parquet")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_set_of_bad_examples_raises_naming_it_instead_of_hanging(processor, tmp_path, streaming):
    path = all_bad_parquet(tmp_path)
    loader = build_train_dataloader(config(path, num_epochs=None, streaming=streaming), processor, SEQ_LEN)
    with time_limit(60), pytest.raises(NoUsableSamplesError) as error:
        next(iter(loader))
    message = str(error.value)
    assert path in message and "split 'train'" in message
    assert "invalid_image x" in message and "example " in message


def test_llava_json_with_a_wrong_image_root_raises_from_the_workers(processor, tmp_path):
    data = config(
        chat_jsonl(tmp_path), dataset="json", image_root=str(tmp_path / "nowhere"), num_epochs=None, num_workers=2
    )
    with time_limit(120), pytest.raises(NoUsableSamplesError, match=r"invalid_image x\d+, e\.g\. example \d+"):
        next(iter(build_train_dataloader(data, processor, SEQ_LEN)))


def test_a_reader_with_an_empty_share_does_not_stop_the_others(processor):
    # 3 examples, 2 ranks x 2 workers: rank 1's second reader (reader 3) has nothing to read.
    loader = build_train_dataloader(
        scenes(3, num_epochs=None, num_workers=2), processor, SEQ_LEN, rank=1, world_size=2
    )
    with time_limit(60):
        steps = train_steps([loader], 3)
    assert all(steps) and not loader.ended  # reader 1 reads position 1 of each epoch's order, over and over


def test_fewer_examples_than_ranks_is_refused_on_every_rank(processor):
    for rank in range(4):
        with pytest.raises(ValueError, match="has 3 examples, fewer than the 4 ranks"):
            build_train_dataloader(scenes(3), processor, SEQ_LEN, rank, 4)


def test_redeal_in_isolation_leaves_exactly_the_unconsumed_positions():
    deal = Deal(20, 4, seed=1, shuffle=True)
    # Reader 0 read 3, all consumed; reader 1 read 5: the first consumed, then of the next four the 1st and 3rd are
    # still buffered; readers 2 and 3 read nothing.
    progress = [
        ReaderProgress(0, 0, 3, []),
        ReaderProgress(1, 0, 1, [False, True, False, True]),
        ReaderProgress(2, 0, 0, []),
        ReaderProgress(3, 0, 0, []),
    ]
    redealt = redeal(deal, progress, readers=3, num_epochs=None)
    consumed = {0, 4, 8, 1, 9, 17}  # reader j reads positions j, j + 4, ...
    remaining = sorted(np.concatenate([redealt.share(0, j) for j in range(3)]).tolist())
    assert remaining == sorted(set(range(20)) - consumed)
    assert redealt.share(1, 0).tolist() == list(range(0, 20, 3))  # the next epoch is whole again
    again = Deal.from_state(json.loads(json.dumps(redealt.state())), 20, 1, True)
    assert all((again.share(0, j) == redealt.share(0, j)).all() for j in range(3))


# Settings a resume may change


def test_a_stream_stopped_by_a_truncated_shard_resumes_with_on_bad_files_warn_and_delivers_the_rest_once(
    processor, tmp_path
):
    # The recovery path: the run stops naming the shard; the user resumes from the last checkpoint skipping it.
    # on_bad_files, max_image_bytes and allow_paths_outside_image_root change no position, so a resume may change them.
    for shard, first in ((0, 0), (1, 0), (2, 60)):
        table = pa.table({"txt": [caption(i) for i in range(first, first + 60)], "jpg": [png_bytes()] * 60})
        pq.write_table(table, tmp_path / f"shard-00{shard}.parquet")
    whole = (tmp_path / "shard-001.parquet").read_bytes()
    (tmp_path / "shard-001.parquet").write_bytes(whole[: len(whole) // 2])
    files = ",".join(str(tmp_path / f"shard-00{shard}.parquet") for shard in range(3))
    data = config(dataset="parquet", data_files=files, streaming=True)
    loader = build_train_dataloader(data, processor, SEQ_LEN)
    first = delivered(train_steps([loader], 2))
    assert first and max(first) < 60
    state = saved(loader)
    with pytest.raises(DataSourceError, match=r"shard-001.parquet .*on_bad_files='warn'"):
        train_steps([loader], None)
    lenient = DataConfig(**{**vars(data), "on_bad_files": "warn", "max_image_bytes": 10**6,
                            "allow_paths_outside_image_root": True})
    resumed = build_ranks(lenient, processor, 1, [state])
    rest = delivered(train_steps(resumed, None))
    assert sorted(first + rest) == list(range(120))
    assert resumed[0].samples_seen == 120
