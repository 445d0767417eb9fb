"""Stopping on a scheduler's SIGTERM: finish the step, save a checkpoint, exit 0.

A cluster scheduler pre-empts a job with `kill -TERM -PGID` (torchrun passes it on to each rank's own process
group): the signal reaches every process of the group. The training process only notes the request
(`StopRequested`); the loop folds it into the step's one collective, so that every rank stops after the same step,
then saves and returns.

The data loader's workers must not receive it: torch installs a handler in each worker that dies on a SIGTERM not
sent by its parent, and the trainer's next batch would then fail ("DataLoader worker (pid N) is killed by signal:
Terminated") before any checkpoint. `batches_through_sigterm` moves each worker into a process group of its own
(a `worker_init_fn`), holding SIGTERM back while they start so that one sent to the group between a worker's fork and
its move is dropped there. Signals from the training process still reach them as before (torch's handler, the
parent's `terminate()` at shutdown), and a worker whose parent died still ends on its own (torch's watchdog).
Ignoring SIGTERM in the workers instead would hang the process at exit after an error: multiprocessing's exit
handler terminates daemonic children and waits for them.

Inductor's compile workers (a sidecar process and its pool, started at the first compilation) must not receive it
either: the sidecar dies on it, and torch (2.11 hangs, measured on an H100; 2.13 on CPU too) then waits forever for
the next compilation, which a new image shape brings at any step. `compile_workers_through_sigterm` starts them
with SIGTERM held back, which they inherit for good; they still end with the training process (torch's watchdog).
"""

from __future__ import annotations

import functools
import os
import signal
from contextlib import contextmanager


class StopRequested:
    """SIGTERM asks for a checkpoint and a clean exit at the end of the current step (this process's view)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _leave_the_job_group(worker_init_fn, worker_id: int) -> None:
    os.setpgrp()
    # A SIGTERM sent to the job's group while this worker started is pending (held back, see `sigterm_held_back`):
    # take it without acting on it, then let later ones (from the training process) through to torch's handler.
    signal.sigtimedwait([signal.SIGTERM], 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def workers_in_their_own_process_group(loader) -> None:
    """Start the loader's worker processes in process groups of their own (see the module docstring).

    `loader` is a `processing.data.PackedDataLoader` (its torch loader is `.loader`) or a torch DataLoader.
    """
    torch_loader = getattr(loader, "loader", loader)
    if getattr(torch_loader, "num_workers", 0):  # tests/test_train_distributed.py checks PackedDataLoader's
        torch_loader.worker_init_fn = functools.partial(_leave_the_job_group, torch_loader.worker_init_fn)


@contextmanager
def sigterm_held_back():
    """SIGTERM stays pending in this thread (and in the processes it forks) until the block ends, then arrives."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def compile_workers_through_sigterm() -> None:
    """Start Inductor's compile workers now, with SIGTERM held back in them (see the module docstring)."""
    from torch._inductor.async_compile import AsyncCompile

    with sigterm_held_back():
        AsyncCompile.warm_pool()  # nothing to start where Inductor compiles in this process (one compile thread)


def batches_through_sigterm(loader):
    """`iter(loader)`, with workers out of the job's process group; they start at the first batch, fetched with
    SIGTERM held back (a worker inherits the block until it has left the group)."""
    workers_in_their_own_process_group(loader)
    batches = iter(loader)
    with sigterm_held_back():
        first = next(batches)
    yield first
    yield from batches
