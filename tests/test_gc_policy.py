"""The training loop's garbage-collection schedule (examples/train_lib/gc_policy.py)."""

import gc
import sys

import pytest

from tests.test_train import EXAMPLES

sys.path.insert(0, str(EXAMPLES))

from train_lib.gc_policy import GarbageCollection


@pytest.fixture
def collections(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    yield calls
    gc.enable()


def test_automatic_collection_is_off_while_training_and_back_after(collections):
    assert gc.isenabled()
    collector = GarbageCollection(every=3)
    assert not gc.isenabled()
    for step in range(1, 10):
        collector.step(step)
    collector.close()
    assert gc.isenabled()
    assert collections == [2, 1, 1, 1]  # a full one before training, then the young generations at steps 3, 6, 9


def test_zero_keeps_pythons_own_schedule(collections):
    collector = GarbageCollection(every=0)
    for step in range(1, 10):
        collector.step(step)
    collector.close()
    assert gc.isenabled() and collections == []


def test_a_collector_that_was_off_stays_off(collections):
    gc.disable()
    GarbageCollection(every=5).close()
    assert not gc.isenabled()
