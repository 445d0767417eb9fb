"""Stopping on a scheduler's SIGTERM: finish the step, save a checkpoint, exit 0.

A cluster scheduler pre-empts a job with `kill -TERM -PGID`: the signal reaches every process of the group, the
data loader's workers included. The training process only notes the request (`StopRequested`); the loop folds it
into the step's one collective, so that every rank stops after the same step, then saves and returns.

The workers must outlive the signal: torch installs a handler in each worker that dies on a SIGTERM not sent by
its parent, and the trainer's next batch would then fail ("DataLoader worker (pid N) is killed by signal:
Terminated") before any checkpoint. `batches_through_sigterm` makes them ignore it (a `worker_init_fn`), and holds
SIGTERM back while they start, so that one arriving between a worker's fork and its init is discarded there (and
delivered to the training process once they run). They still end when the main process shuts the loader down, and
on their own if it dies (torch's worker watchdog).
"""

from __future__ import annotations

import functools
import signal
from contextlib import contextmanager


class StopRequested:
    """SIGTERM asks for a checkpoint and a clean exit at the end of the current step (this process's view)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _ignore_sigterm(worker_init_fn, worker_id: int) -> None:
    # Runs after torch's own worker signal set-up, so this disposition is the one that stays; ignoring a signal
    # discards it if it is pending (it arrived while blocked, see `batches_through_sigterm`).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def keep_workers_through_sigterm(loader) -> None:
    """Make the loader's worker processes ignore SIGTERM (see the module docstring); call before iterating.

    `loader` is a `processing.data.PackedDataLoader` (its torch loader is `.loader`) or a torch DataLoader.
    """
    torch_loader = getattr(loader, "loader", loader)
    if getattr(torch_loader, "num_workers", 0):  # tests/test_train_distributed.py checks PackedDataLoader's
        torch_loader.worker_init_fn = functools.partial(_ignore_sigterm, torch_loader.worker_init_fn)


@contextmanager
def sigterm_held_back():
    """SIGTERM stays pending in this thread (and in the processes it forks) until the block ends, then arrives."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def batches_through_sigterm(loader):
    """`iter(loader)`, with workers that ignore SIGTERM; they start at the first batch, fetched with SIGTERM held
    back (a worker inherits the block until its init ignores the signal)."""
    keep_workers_through_sigterm(loader)
    batches = iter(loader)
    with sigterm_held_back():
        first = next(batches)
    yield first
    yield from batches
