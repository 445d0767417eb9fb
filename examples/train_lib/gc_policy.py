"""Python's garbage collector on the training step's schedule, not on allocation counts.

With compiled graphs alive the process holds millions of Python objects, and a collection of the older generations
walks them all: tens of milliseconds at a moment set by how many objects the step allocated, the same steps in every
run. One rank collecting while the others wait at the next collective is a straggler on every backend. So automatic
collection is off during training and a young-generation collection (`gc.collect(1)`, what torchtitan does too)
runs every `every` steps, on every rank at the same step. Objects that survive it stay in the oldest generation,
which training never sweeps; the loop is built not to leave reference cycles behind (any it does stay in memory
until the run ends or `gc.enable()`).
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
