"""Where a steady training step's time goes: by phase (device-clock marks from module hooks) and by kernel kind.

`PhaseMarks` puts a mark (a CUDA event, or the host clock on the CPU) at the edges of each phase of a step:
the vision tower's forward, the decoder's forward, the loss (lm_head and cross-entropy, whose chunked form also
computes its gradients), the backward down to the vision tower, the vision tower's backward (from the gradient of
its output to the last gradient of its parameters), the rest of the backward, and the optimizer step.

`kernel_summary` reads a torch.profiler run of a few steps and sums the device time of each kind of kernel (matmul,
attention, compiled Triton kernels, eager elementwise and reductions, optimizer, copies, NCCL), the time the device
sat idle inside the steps, and the host syncs the steps made (`aten::_local_scalar_dense`, `.tolist()` and
`nonzero`, stream and device synchronizes).
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch

PHASES = ("vision_fwd", "decoder_fwd", "loss", "backward_to_vision", "vision_bwd", "backward_rest", "optimizer", "other")

# First match wins; names are lowercased kernel names.
KERNEL_KINDS = (
    ("nccl", ("nccl",)),
    ("memcpy/memset", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention", "flex", "attn", "sdpa")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "matmul", "mm_", "splitk", "cublas", "s16816", "s1688",
                "triton_tem")),
    ("triton (compiled)", ("triton_",)),
    ("elementwise/reduction (eager)", ("elementwise", "vectorized", "reduce", "softmax", "layer_norm", "norm",
                                       "index", "scatter", "gather", "cat", "copy", "fill")),
)
HOST_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaEventSynchronize")


class PhaseMarks:
    """Hooks on the model that mark phase edges; `step()` brackets one training step, `table()` gives medians."""

    def __init__(self, model, device: torch.device):
        self.cuda, self.rows, self.current = device.type == "cuda", [], None
        vision, decoder = model.model.vision_tower, model.model.language_model
        # The tower's first and last modules, which packed images (use_packed_vision) call without the tower's own
        # forward; transformers < 5.24 keeps them in `vision_model`.
        inner = getattr(vision, "vision_model", vision)
        self.handles = [
            inner.embeddings.register_forward_pre_hook(lambda *_: self.mark("vision_fwd")),
            inner.post_layernorm.register_forward_hook(self._vision_output),
            decoder.register_forward_pre_hook(lambda *_: self.mark("decoder_fwd")),
            decoder.register_forward_hook(lambda *_: self.mark("loss")),
            torch.autograd.graph.register_multi_grad_hook(
                [p for p in vision.parameters() if p.requires_grad], lambda _: self.mark("backward_rest"), mode="all"),
        ]

    def _vision_output(self, module, args, output):
        self.mark("vision_end")
        hidden = output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: self.mark("vision_bwd"))

    def mark(self, name: str) -> None:
        if self.current is None:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.current.append((name, event))
        else:
            self.current.append((name, time.perf_counter()))

    def start(self):
        self.current = []
        self.mark("start")

    def finish(self):
        self.mark("end")
        self.rows.append(self.current)
        self.current = None

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def table(self) -> dict:
        """Median milliseconds per phase over the marked steps. A phase runs from its mark to the next mark."""
        if self.cuda:
            torch.cuda.synchronize()
        per_phase: dict[str, list[float]] = {name: [] for name in PHASES}
        for marks in self.rows:
            spent = dict.fromkeys(PHASES, 0.0)
            for (name, a), (_, b) in itertools.pairwise(marks):
                ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
                spent[_PHASE_OF_MARK.get(name, "other")] += ms
            for name in PHASES:
                per_phase[name].append(spent[name])
        steps = [sum(v[i] for v in per_phase.values()) for i in range(len(self.rows))]
        return {"steps": len(self.rows), "step_ms": _median(steps),
                "phase_ms": {name: round(_median(values), 2) for name, values in per_phase.items()}}


# The phase a mark opens; "backward" is marked by the training step just before loss.backward().
_PHASE_OF_MARK = {"start": "other", "vision_fwd": "vision_fwd", "vision_end": "other", "decoder_fwd": "decoder_fwd",
                  "loss": "loss", "backward": "backward_to_vision", "vision_bwd": "vision_bwd",
                  "backward_rest": "backward_rest", "optimizer": "optimizer", "after_optimizer": "other"}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def kernel_summary(profiler, steps: int, window_ms: float) -> dict:
    """Device milliseconds per step by kernel kind, idle time, the top kernels, and host syncs per step."""
    device_kind = torch.autograd.DeviceType.CUDA
    kinds: dict[str, float] = {}
    top: dict[str, float] = {}
    intervals = []
    syncs: dict[str, list[float]] = {}
    for event in profiler.events():
        if event.device_type == device_kind:
            ms = event.time_range.elapsed_us() / 1e3
            kind = kernel_kind(event.name)
            kinds[kind] = kinds.get(kind, 0.0) + ms
            top[event.name] = top.get(event.name, 0.0) + ms
            intervals.append((event.time_range.start, event.time_range.end))
        elif event.name in HOST_SYNCS:
            calls = syncs.setdefault(event.name, [0, 0.0])
            calls[0] += 1
            calls[1] += event.time_range.elapsed_us() / 1e3
    busy_ms = _union_us(intervals) / 1e3
    per_step = {kind: round(ms / steps, 2) for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return {
        "steps": steps,
        "window_ms_per_step": round(window_ms / steps, 2),
        "device_busy_ms_per_step": round(busy_ms / steps, 2),
        "device_idle_ms_per_step": round(max(0.0, window_ms - busy_ms) / steps, 2) if intervals else None,
        "kernel_ms_per_step": per_step,
        "top_kernels_ms_per_step": {name[:120]: round(ms / steps, 2)
                                    for name, ms in sorted(top.items(), key=lambda kv: -kv[1])[:15]},
        "host_syncs_per_step": {name: {"calls": round(c / steps, 1), "host_ms": round(ms / steps, 2)}
                                for name, (c, ms) in syncs.items()},
    }


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
