"""Counting torch.compile's work while a benchmark runs, and deciding when a run has reached its steady state.

`CompileWatch` records every compilation as it happens (dynamo's own start/end callbacks: a new or recompiled
graph, and AOT autograd's lazy backward compile), the step it happened in, how long it took, and the reason dynamo
gives for each recompile. `snapshot()` reads dynamo's counters (unique graphs, graph breaks, recompiles) and the
inductor cache's hits and misses, so that a run can say how many graphs it holds after N steps and whether any
compile fell inside its timed window.

`SteadyState` is the warm-up rule: at least `min_steps` steps, no compilation in the last `quiet` steps, and the
median of the last `quiet` step times within `tolerance` of the median of the `quiet` before them.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class CompileEvent:
    step: int  # the training step (0-based) during which it ran; -1 before the first step
    trigger: str  # DYNAMO (a frame compiled or recompiled) or LAZY_BACKWARD (a backward graph's first call)
    compile_id: str
    seconds: float


class _RecompileReasons(logging.Handler):
    def __init__(self, watch: CompileWatch):
        super().__init__(logging.DEBUG)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if len(self.watch.recompile_reasons) < 50:
            self.watch.recompile_reasons.append({"step": self.watch.step, "reason": message[:600]})


@dataclass
class CompileWatch:
    step: int = -1
    events: list = field(default_factory=list)
    recompile_reasons: list = field(default_factory=list)
    _started: dict = field(default_factory=dict)

    def install(self) -> CompileWatch:
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._on_start)
        handler.register_end_callback(self._on_end)
        # The "recompiles" log artifact says which guard failed; keep the messages instead of printing them.
        torch._logging.set_logs(recompiles=True)
        logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        logger.handlers = [_RecompileReasons(self)]
        logger.propagate = False
        return self

    def _on_start(self, args) -> None:
        self._started[args.compile_id] = time.perf_counter()

    def _on_end(self, args) -> None:
        started = self._started.pop(args.compile_id, None)
        seconds = time.perf_counter() - started if started is not None else float("nan")
        trigger = getattr(args.callback_trigger, "name", str(args.callback_trigger))
        self.events.append(CompileEvent(self.step, trigger, str(args.compile_id), seconds))

    def events_in(self, first_step: int, last_step: int) -> list[CompileEvent]:
        return [e for e in self.events if first_step <= e.step <= last_step]

    def last_step_with_compile(self) -> int:
        return max((e.step for e in self.events), default=-1)

    @staticmethod
    def snapshot() -> dict:
        """dynamo's counters now: graphs compiled so far, recompiles, graph breaks, inductor cache hits/misses."""
        counters = torch._dynamo.utils.counters
        return {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "frames_compiled": counters["frames"]["ok"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        }

    def summary(self) -> dict:
        by_trigger: dict[str, int] = {}
        for e in self.events:
            by_trigger[e.trigger] = by_trigger.get(e.trigger, 0) + 1
        # compile_id is "frame/attempt": attempt 0 is a frame's first graph, any later one a recompile.
        recompiles = sum(1 for e in self.events if e.trigger == "DYNAMO" and not e.compile_id.split("_")[0].endswith("/0"))
        return {"compiles": len(self.events), "by_trigger": by_trigger, "recompiles": recompiles,
                "compile_s": round(sum(e.seconds for e in self.events), 2),
                "events": [asdict(e) for e in self.events[:200]], "recompile_reasons": self.recompile_reasons}


@dataclass
class SteadyState:
    min_steps: int = 5
    quiet: int = 5
    tolerance: float = 0.10

    def reached(self, step_seconds: list[float], last_compile_step: int) -> bool:
        """After len(step_seconds) warm-up steps (0-based steps 0..n-1), is the run steady?"""
        n = len(step_seconds)
        if n < max(self.min_steps, 2 * self.quiet) or last_compile_step > n - 1 - self.quiet:
            return False
        recent = statistics.median(step_seconds[-self.quiet:])
        before = statistics.median(step_seconds[-2 * self.quiet : -self.quiet])
        return abs(recent - before) <= self.tolerance * before
