"""benchmarks/trace_report.py's arithmetic on a hand-made trace: step boundaries, compute, NCCL overlap, idle."""

import gzip
import json

import pytest

from benchmarks.trace_report import collective_waits, host_costs, load, report, step_table


def span(name, ts, dur, cat, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid, "args": args}


@pytest.fixture
def trace(tmp_path):
    events = [
        # two steps of 100 µs each, by the loop's ranges on the host
        span("trainer/next_batch", 0, 10, "user_annotation"),
        span("trainer/forward_backward", 10, 70, "user_annotation"),
        span("FSDP::pre_forward (layers.0)", 12, 8, "user_annotation"),
        span("aten::nonzero", 30, 20, "cpu_op"),
        span("cudaStreamSynchronize", 35, 15, "cuda_runtime"),
        span("trainer/next_batch", 100, 10, "user_annotation"),
        span("trainer/optimizer", 150, 40, "user_annotation"),
        # step 1: compute 20-50, NCCL 40-70 (10 overlapped, 20 not): busy 50, idle 50
        span("gemm", 20, 30, "kernel"),
        span("ncclDevKernel_AllGather", 40, 30, "kernel", **{"Collective name": "_allgather_base",
                                                            "dtype": "BFloat16", "Out msg nelems": 8}),
        # step 2: compute 120-140 and 160-170, a second, slower run of the same all-gather at 180-190
        span("gemm", 120, 20, "kernel"),
        span("Memcpy DtoD", 160, 10, "gpu_memcpy"),
        span("ncclDevKernel_AllGather", 180, 10, "kernel", **{"Collective name": "_allgather_base",
                                                             "dtype": "BFloat16", "Out msg nelems": 8}),
    ]
    path = tmp_path / "rank0.trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, file)
    return str(path)


def test_steps_split_device_time_into_compute_nccl_and_idle(trace):
    first, second = step_table(load(trace))
    assert first["step_ms"] * 1e3 == 100 and second["step_ms"] * 1e3 == 90  # the last step ends with its last range
    assert first["compute_ms"] * 1e3 == 30 and first["nccl_ms"] * 1e3 == 30
    assert first["nccl_exposed_ms"] * 1e3 == 20 and first["idle_ms"] * 1e3 == 50
    assert second["compute_ms"] * 1e3 == 30 and second["nccl_exposed_ms"] * 1e3 == 10
    assert second["idle_ms"] * 1e3 == 50
    assert first["host_phases_ms"] == {"next_batch": 0.0, "forward_backward": 0.1}


def test_collectives_fastest_and_median_and_host_costs(trace):
    events = load(trace)
    (gather,) = collective_waits(events)
    assert (gather["calls"], gather["fastest_ms"] * 1e3, gather["total_ms"] * 1e3) == (2, 10, 40)
    fsdp, syncs = host_costs(events)
    assert fsdp["FSDP::pre_forward"] * 1e3 == pytest.approx(8)
    assert dict(syncs["cudaStreamSynchronize"]) == {"aten::nonzero < trainer/forward_backward": pytest.approx(0.015)}
    assert "2 profiled steps" in report(trace)
