"""Where a steady training step waits on the host: every synchronising CUDA call, with the Python line that made it.

Builds one variant of the training benchmark exactly as `train_worker.py` does (same model, batches, optimisations),
warms it up, then for `--steps` steps records, per step, the host time to issue the step (no sync), the device
time (CUDA events) and the batch's image count N and padded patch length L, so slow steps can be tied to what they
carried. One more step runs under `torch.cuda.set_sync_debug_mode("warn")`: each operation that makes the host wait
for the device warns, and the Python stack at that moment names the line (e.g. a `.tolist()`, `nonzero`, a
pageable host-to-device copy, a size check).

    python benchmarks/sync_audit.py --variant all --json /tmp/syncs.json          # on the GPU machine
    python benchmarks/sync_audit.py --variant all --json /tmp/syncs.json --tiny   # CPU: the code path only
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.train_worker import GarbageCollection, parse_args, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def caller_lines(stack: list, keep: int = 4) -> list[str]:
    """The innermost frames of a stack, without this file's and the warnings module's own."""
    frames = [f for f in stack if "warnings" not in f.filename and f.filename != __file__]
    return [f"{os.path.relpath(f.filename, REPO) if f.filename.startswith(REPO) else f.filename}:{f.lineno} "
            f"{f.name}" for f in frames[-keep:]]


def audit_one_step(step_fn, batch) -> list[dict]:
    """Run one step with CUDA's sync debug mode on; each synchronising call becomes a warning with its stack."""
    seen: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        seen[(str(message).splitlines()[0][:120], tuple(caller_lines(traceback.extract_stack())))] += 1

    original = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            step_fn(batch)
            torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = original
    return [{"count": n, "message": message, "stack": list(stack)} for (message, stack), n in seen.most_common()]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = 16
    device, warmup = args.device, args.min_warmup + 7
    _, step_fn, batches, _ = setup(args, warmup + args.steps + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    collector = GarbageCollection(args.gc_every)
    for step, batch in enumerate(batches[:warmup]):
        step_fn(batch)
        collector.step(step + 1)
        sync()

    rows = []
    for step, batch in enumerate(batches[warmup : warmup + args.steps], start=warmup + 1):
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        step_fn(batch)
        issued = time.perf_counter() - start
        if device.type == "cuda":
            end.record()
        collector.step(step)
        sync()
        total = time.perf_counter() - start
        N, L = batch.tensors["pixel_values"].shape[:2] if "pixel_values" in batch.tensors else (0, 0)
        rows.append({"host_issue_ms": round(1e3 * issued, 1), "wall_ms": round(1e3 * total, 1),
                     "device_ms": round(begin.elapsed_time(end), 1) if device.type == "cuda" else None,
                     "N": int(N), "L": int(L)})
    syncs = audit_one_step(step_fn, batches[warmup + args.steps]) if device.type == "cuda" else []
    result = {"variant": args.variant, "gc_every": args.gc_every,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "steps": rows, "syncs": syncs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    for row in rows:
        print(row)
    for entry in syncs:
        print(entry["count"], entry["message"], *entry["stack"], sep="\n    ")


if __name__ == "__main__":
    main()
