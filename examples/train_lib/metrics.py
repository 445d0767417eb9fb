"""What the training loop measures: step times and the steady state after compilation, MFU, stragglers, and
`steps.jsonl`.

Steady state. The first steps of a run are slow for reasons that say nothing about the run's speed: torch.compile
traces and compiles (each new shape or graph break again), CUDA and the allocator warm up, loader workers start.
`StepClock` calls a step warm-up while torch._dynamo's compile counters still move on any rank (a rank that compiles
holds the others at the step's collectives; the step summary carries the flag), and at least
`MIN_WARMUP_STEPS`; the steps after the last one that compiled are steady, and the run's speed is the median of
theirs, with p10 and p90 for the spread. `compile_seconds` is the time from the loop's start to the first steady
step; `graph_count` the number of graphs Dynamo compiled.

Stragglers (see `step_sync`): each step's `straggler_work` (the ranks' modelled FLOPs, largest over mean) and
`straggler_compute` (the same for their measured forward time, `ForwardTimer`). report.json keeps the steady
steps' `straggler_ratio_work` (their mean: the figure is exact, and the mean is what the imbalance costs over the
run) and `straggler_ratio_compute` (their median: timings have outliers, a preempted thread or a collection). A
step's forward time is gathered one step late, so in `steps.jsonl` and the trackers step k's `straggler_compute`
is that of step k-1 (null at the first step a job of several processes runs, 1.0 on one process); the report
files each under the step it measured.

`steps.jsonl` (one JSON object per optimizer step, written by the job's main process) proves that a resumed run
saw the same data as an uninterrupted one: each line holds the step's loss and a digest of the sample ids every
rank trained on (see `step_sync`). A resumed run first drops the lines after its checkpoint's step.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

MIN_WARMUP_STEPS = 3
# The progress bar's running figures cover at most this many recent steady steps.
RECENT_STEPS = 100


def compile_counters() -> tuple[int, ...]:
    """What moves whenever torch.compile compiles something: frames traced, graphs, AOT and Inductor compilations."""
    from torch._dynamo.utils import counters

    return (
        sum(counters["frames"].values()),
        sum(counters["stats"].values()),
        sum(counters["aot_autograd"].values()),
        sum(counters["inductor"].values()),
    )


def graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def spread(values) -> dict | None:
    """Median with p10 and p90: the typical value and how much it moves."""
    if len(values) == 0:
        return None
    p10, median, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return {"p10": float(p10), "median": float(median), "p90": float(p90)}


def model_flops_utilization(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float | None,
                            num_processes: int) -> float | None:
    """Achieved model FLOP/s over the peak of all devices; None where the device's peak is unknown (CPU)."""
    if not peak_flops_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_flops_per_device * num_processes)


class StepClock:
    """Wall time, global tokens and straggler ratios of each step this process ran, and which of them are steady
    (see the module doc).

    A step's time runs on the host from its start, or from the previous step's end where that came later, to the
    read of its summary (the host sync), so on a GPU it includes the device's work. A summary read a step late
    (`loop.Trainer.may_read_late`) ends its step after the next one started: the time from the previous read is then
    one step's. Checkpoint saves and evaluations happen between steps and are not counted.
    """

    def __init__(self, flops_per_token: float, peak_flops_per_device: float | None, num_processes: int):
        self.flops_per_token, self.peak, self.num_processes = flops_per_token, peak_flops_per_device, num_processes
        self.loop_start = time.perf_counter()
        self.starts: list[float] = []
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.straggler_work: list[float] = []  # by step, as `self.seconds`
        self.straggler_compute: list[float] = []  # by the step measured; NaN: not measured (yet)
        self.last_compiling_step = 0  # steps counted from 1 in this process; 0: none compiled
        self._counters = compile_counters()
        self._ticks: collections.deque[float] = collections.deque()  # started steps not yet ended
        self._last_end = -math.inf

    def start_step(self) -> None:
        self._ticks.append(time.perf_counter())

    def compiled_this_step(self) -> bool:
        """Whether this process compiled anything since the last call (the step summary tells the other ranks)."""
        counters = compile_counters()
        compiled, self._counters = counters != self._counters, counters
        return compiled

    def end_step(self, tokens: int, straggler_work: float = math.nan, straggler_compute: float = math.nan,
                 compiled: bool | None = None) -> None:
        """`straggler_compute` is the previous step's (see the module doc), and filed under it. `compiled`: whether
        any rank compiled during the step (from the step summary); None: this process's own counters decide."""
        start, end = max(self._ticks.popleft(), self._last_end), time.perf_counter()
        self.starts.append(start)
        self.seconds.append(end - start)
        self._last_end = end
        self.tokens.append(tokens)
        self.straggler_work.append(straggler_work)
        if self.straggler_compute:
            self.straggler_compute[-1] = straggler_compute
        self.straggler_compute.append(math.nan)
        if compiled is None:
            compiled = self.compiled_this_step()
        if compiled:
            self.last_compiling_step = len(self.seconds)

    @property
    def warmup_steps(self) -> int:
        return max(MIN_WARMUP_STEPS, self.last_compiling_step)

    def tokens_per_second(self, first: int = 0) -> np.ndarray:
        return np.asarray(self.tokens[first:], dtype=np.float64) / np.asarray(self.seconds[first:], dtype=np.float64)

    def mfu(self, tokens_per_second: float | None) -> float | None:
        if tokens_per_second is None:
            return None
        return model_flops_utilization(tokens_per_second, self.flops_per_token, self.peak, self.num_processes)

    def last_step(self) -> dict:
        """This step's own figures, for the trackers (warm-up steps too: a tracker shows them over time)."""
        rate = self.tokens[-1] / self.seconds[-1]
        return {"tokens_per_s": rate, "mfu": self.mfu(rate), "step_seconds": self.seconds[-1]}

    def recent_steady_rate(self) -> float | None:
        """Median tokens/s over the recent steady steps (the progress bar's figure); None during the warm-up."""
        first = max(self.warmup_steps, len(self.seconds) - RECENT_STEPS)
        rates = self.tokens_per_second(first)
        return float(np.median(rates)) if len(rates) else None

    def summary(self) -> dict:
        """report.json's speed figures: the steady state's spread, the warm-up's cost, the graphs compiled."""
        warmup = self.warmup_steps
        rates = self.tokens_per_second(warmup)
        steady_rate, step_seconds = spread(rates), spread(self.seconds[warmup:])
        mfu = None
        if steady_rate is not None and self.mfu(1.0) is not None:
            mfu = {key: self.mfu(value) for key, value in steady_rate.items()}
        return {
            "tokens_per_second_steady": None if steady_rate is None else steady_rate["median"],
            "mfu_steady": None if mfu is None else mfu["median"],
            "steady_state": {
                "warmup_steps": min(warmup, len(self.seconds)),
                "steps": len(rates),
                "tokens_per_second": steady_rate,
                "mfu": mfu,
            },
            **{f"step_seconds_{key}": value for key, value in (step_seconds or {}).items()},
            "compile_seconds": (self.starts[warmup] - self.loop_start) if len(self.starts) > warmup else None,
            "graph_count": graph_count(),
            "straggler_ratio_work": finite_aggregate(np.mean, self.straggler_work[warmup:]),
            "straggler_ratio_compute": finite_aggregate(np.median, self.straggler_compute[warmup:]),
        }


def finite_aggregate(aggregate, values) -> float | None:
    """`aggregate` of the finite values; None where there is none (no steady step, or none measured)."""
    finite = [value for value in values if math.isfinite(value)]
    return float(aggregate(finite)) if finite else None


class ForwardTimer:
    """Times this rank's forward passes in each training step: the `compute_ms` of `step_sync`, one step late.

    Hooks on the unwrapped model rather than a timer around the call: DDP's forward first broadcasts the model's
    buffers (the rotary `inv_freq`) from rank 0, a collective in which a fast rank would wait for a slow one. Inside
    it the forward has no collective under DDP, ZeRO-1/2 or one process, so its time is the rank's own compute.
    Under FSDP2 and ZeRO-3 the forward all-gathers parameters layer by layer, and each gather waits for every rank:
    there the times include those waits, and the ratio understates the imbalance (`straggler_work` does not).

    On a GPU, a pair of CUDA events around each forward (recording one is no host sync). Their times are read a step
    later, when the next step's forward and backward are queued and the device has long finished them: reading them
    sooner would wait, a second host sync per step. An event not yet complete is never waited for: that step's time
    is NaN (not measured). On a CPU the forward runs on the host: perf_counter.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.armed = False  # only the training step's forwards count, not the evaluation's
        self.current: list = []  # this step's forwards: (start, end) events on a GPU, milliseconds on a CPU
        self.finished: list = []  # the previous step's
        self._start = None
        self.handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    @contextmanager
    def timing(self):
        """Time the forwards run inside."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    # Eager even when the model is compiled whole (DeepSpeed's DeepCompile): traced, the events would be recorded
    # from inside the graph, which DeepCompile's profiler cannot run.
    @torch.compiler.disable
    def _before(self, module, args) -> None:
        if not self.armed:
            return
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    @torch.compiler.disable
    def _after(self, module, args, output) -> None:
        if not self.armed or self._start is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.current.append((self._start, end))
        else:
            self.current.append((time.perf_counter() - self._start) * 1e3)
        self._start = None

    def previous_step_ms(self) -> float:
        """The previous step's forward milliseconds (NaN if this process ran none); this step's are kept for the
        next call."""
        previous, self.finished, self.current = self.finished, self.current, []
        if not previous:
            return math.nan
        if not self.cuda:
            return float(sum(previous))
        if not all(end.query() for _, end in previous):  # never so after a host sync; but never wait either
            return math.nan
        return float(sum(start.elapsed_time(end) for start, end in previous))


class StepLog:
    """Appends one line per optimizer step to `steps.jsonl`; only the job's main process writes (`enabled`).

    Opening it keeps the lines of steps up to `resumed_step` (0 for a fresh run) and drops the rest: those of a
    run killed after its last checkpoint, which the resumed run does again, and a line cut short by the kill.
    """

    def __init__(self, output_dir: str, resumed_step: int, enabled: bool):
        self.path = os.path.join(output_dir, "steps.jsonl")
        self.file = None
        if not enabled:
            return
        kept = [line for line in self._lines() if _step_of(line) is not None and _step_of(line) <= resumed_step]
        os.makedirs(output_dir, exist_ok=True)
        partial = self.path + ".partial"
        with open(partial, "w") as f:
            f.writelines(kept)
        os.replace(partial, self.path)  # a kill now leaves the old file or the new one, never half of each
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the whole run, closed by close()

    def _lines(self) -> list[str]:
        try:
            with open(self.path) as f:
                return f.readlines()
        except FileNotFoundError:
            return []

    def append(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed run loses no finished step's line

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _step_of(line: str) -> int | None:
    if not line.endswith("\n"):
        return None  # cut short
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_steps(output_dir: str) -> list[dict]:
    """The records of `steps.jsonl`, in order."""
    with open(os.path.join(output_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]
