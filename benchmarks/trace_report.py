"""Where the trainer's steps go, from the traces `examples/train.py --profile_steps N` writes.

    python benchmarks/trace_report.py OUTPUT_DIR/profile/rank0.trace.json.gz [rank1.trace.json.gz ...]

For each profiled step: the loop's phases on the host (`trainer/...` ranges), the device's compute time, its NCCL time
and the part of it that no compute overlaps, and the device's idle time. Then, over the steps: each collective's
kernel time against its fastest run (a collective's kernel starts when this rank launches it and ends when the last
rank has joined, so the excess is waiting for other ranks, not the link), the host time inside FSDP2's hooks, and the
host syncs with what called them. A step whose device idles while its host is busy in `forward_backward` is
host-bound: the fix is less host work, not faster kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import Counter, defaultdict

HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def merged(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def length_within(intervals, start, end) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def intersection(a_list, b_list) -> float:
    i = j = 0
    total = 0.0
    while i < len(a_list) and j < len(b_list):
        total += max(0.0, min(a_list[i][1], b_list[j][1]) - max(a_list[i][0], b_list[j][0]))
        if a_list[i][1] < b_list[j][1]:
            i += 1
        else:
            j += 1
    return total


def load(path: str) -> list[dict]:
    with gzip.open(path) if path.endswith(".gz") else open(path) as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def step_table(events) -> list[dict]:
    """Per profiled step (from one `trainer/next_batch` to the next): phases, device compute, NCCL, idle (ms)."""
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("trainer/")]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    nccl = merged((e["ts"], e["ts"] + e["dur"]) for e in device if "nccl" in e["name"].lower())
    compute = merged((e["ts"], e["ts"] + e["dur"]) for e in device if "nccl" not in e["name"].lower())
    starts = sorted(e["ts"] for e in phases if e["name"] == "trainer/next_batch")
    if not starts:
        return []
    last_end = max(e["ts"] + e["dur"] for e in phases)
    rows = []
    for start, end in zip(starts, starts[1:] + [last_end]):
        inside = [[max(a, start), min(b, end)] for a, b in compute if a < end and b > start]
        comm = [[max(a, start), min(b, end)] for a, b in nccl if a < end and b > start]
        busy = length_within(merged(inside + comm), start, end)
        host = Counter()
        for e in phases:
            if start <= e["ts"] < end:
                host[e["name"].removeprefix("trainer/")] += e["dur"] / 1e3
        rows.append({
            "step_ms": (end - start) / 1e3,
            "compute_ms": length_within(inside, start, end) / 1e3,
            "nccl_ms": length_within(comm, start, end) / 1e3,
            "nccl_exposed_ms": (length_within(comm, start, end) - intersection(inside, comm)) / 1e3,
            "idle_ms": (end - start - busy) / 1e3,
            "host_phases_ms": {name: round(ms, 1) for name, ms in sorted(host.items())},
        })
    return rows


def collective_waits(events) -> list[dict]:
    """Each collective (name, dtype, elements): calls, and kernel ms at its fastest and median run."""
    runs = defaultdict(list)
    for e in events:
        if e.get("cat") == "kernel" and "nccl" in e["name"].lower():
            args = e.get("args", {})
            runs[(args.get("Collective name", e["name"][:40]), args.get("dtype"), args.get("Out msg nelems"))].append(
                e["dur"] / 1e3)
    table = [{"collective": name, "dtype": dtype, "elements": elements, "calls": len(ms),
              "fastest_ms": min(ms), "median_ms": statistics.median(ms), "total_ms": sum(ms)}
             for (name, dtype, elements), ms in runs.items()]
    return sorted(table, key=lambda row: -row["total_ms"])


def host_costs(events) -> tuple[Counter, dict[str, Counter]]:
    """Host ms in FSDP2's hooks by kind, and each host sync's callers (the nearest enclosing named range)."""
    fsdp = Counter()
    syncs: dict[str, Counter] = defaultdict(Counter)
    by_thread = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime"):
            by_thread[(e["pid"], e["tid"])].append(e)
            if e["name"].startswith("FSDP::") and " for " not in e["name"]:
                fsdp[e["name"].split(" (")[0]] += e["dur"] / 1e3
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if e["name"] in HOST_SYNCS:
                callers = [s["name"][:50] for s in stack if not s["name"].startswith(("aten::copy_", "aten::_to_copy",
                                                                                      "aten::to", "aten::item"))]
                syncs[e["name"]][" < ".join(reversed(callers[-3:])) or "(top level)"] += e["dur"] / 1e3
            stack.append(e)
    return fsdp, syncs


def report(path: str) -> str:
    events = load(path)
    steps = step_table(events)
    n = max(1, len(steps))
    lines = [f"== {path}: {len(steps)} profiled steps (ms)"]
    for row in steps:
        lines.append(f"step {row['step_ms']:7.1f} | compute {row['compute_ms']:6.1f}  nccl {row['nccl_ms']:6.1f} "
                     f"(not overlapped {row['nccl_exposed_ms']:5.1f})  idle {row['idle_ms']:6.1f} | host "
                     + " ".join(f"{k} {v}" for k, v in row["host_phases_ms"].items()))
    waits = collective_waits(events)
    if waits:
        lines.append("collectives (kernel ms a step; fastest run vs median: the excess waits for other ranks):")
        for row in waits[:8]:
            lines.append(f"  {row['collective']:<22} {row['dtype'] or '':<9} {row['elements'] or 0:>11} elems "
                         f"x{row['calls'] / n:5.1f}  fastest {row['fastest_ms']:6.2f}  median {row['median_ms']:6.2f}"
                         f"  total {row['total_ms'] / n:6.1f}")
    fsdp, syncs = host_costs(events)
    if fsdp:
        lines.append("host ms a step in FSDP2 hooks (nested ranges overlap): "
                     + ", ".join(f"{name} {ms / n:.1f}" for name, ms in fsdp.most_common(6)))
    for name, callers in syncs.items():
        lines.append(f"{name}: " + "; ".join(f"{ms / n:.1f} ms under {caller}" for caller, ms in callers.most_common(4)))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", help="profile/rank{R}.trace.json.gz files")
    for path in parser.parse_args().traces:
        print(report(path))


if __name__ == "__main__":
    main()
