"""Python's garbage collector on the training step's schedule, not on allocation counts.

With compiled graphs alive the process holds millions of Python objects, and a collection of the older generations
walks them all, at a moment set by how many objects each rank allocated. On several ranks, one rank collecting while
the others wait at the next collective is a straggler. So automatic collection is off during training and a
young-generation collection (`gc.collect(1)`, as torchtitan does) runs every `every` steps, on every rank at the same
step. On one H200 it changed nothing measurable (BENCHMARKS.md, issue 13): it is there for the ranks' alignment.
Objects that survive a collection stay in the oldest generation, which training never sweeps; the loop is built not
to leave reference cycles behind (any it does stay in memory until the run ends or `gc.enable()`).
"""

from __future__ import annotations

import gc


class GarbageCollection:
    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        if every > 0:
            gc.collect()  # start training from a clean heap, then keep the collector out of the steps
            gc.disable()

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every > 0 and self.was_enabled:
            gc.enable()
