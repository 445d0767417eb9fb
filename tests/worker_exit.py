"""How the torchrun workers of the tests end: without the interpreter's teardown.

A rank sometimes aborted after its work was done, in the interpreter's own teardown ("terminate called without an
active exception", SIGABRT): 1 run in 6 of distributed_checkpoint_worker.py's resume phase, and in CI runs of both
workers, with a barrier before the end in place; not in 30 runs under PYTHONFAULTHANDLER, so its cause (a C++ object
of torch.distributed or gloo destroyed with a live thread, by its message) is not pinned down. torchrun then stops
the other ranks and the test fails. A worker calls this once everything its test reads is written.
"""

import os
import sys


def leave_without_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
