"""The collective that ends every training step: each rank's step summary, all-gathered in one small vector.

Each rank puts its figures for the step into a float64 vector on its device: its part of the loss and the gradient
norm (device tensors, never read on the host before this), then host-side numbers (tokens, samples, how many
sample ids, samples so far, whether SIGTERM arrived, whether it compiled a graph, the rank's modelled work and its measured forward time, the
skipped examples so far) and a digest of its sample ids. One all-gather and one copy to the host later (the step's
only host sync), every rank holds every rank's row and so takes the same decisions: skip the optimizer step when
any rank's loss or the gradient norm is not finite, stop when any rank was asked to, raise when the data is mostly
bad, and call a step warm-up when any rank compiled in it (the others waited for it at the step's collectives).
The copy can be read a step late (`start_step_summary`, then `PendingSummary.read()`): the skip decision itself
stays on the device (`found_inf()`) for an optimizer that takes it, and the loop reads the summary once the next
step's work is queued, so that the device never waits for the host between steps.

Stragglers. Every step ends in collectives that wait for the slowest rank, so a rank given more work than the
others slows all of them; packing makes ranks' work differ although their row counts agree (tokens, images and
attention spans vary). Two figures per step show how much, each the largest rank's over the mean of all ranks
(`straggler_ratio`; 1.0 is balanced, and at 1.2 the ranks wait on average a sixth of the slowest rank's time):
- `straggler_work`: the ranks' modelled FLOPs (`reporting.FlopModel` on the CPU batch), the imbalance the data
  dealt, free of any timing noise;
- `straggler_compute`: the ranks' measured forward time (`metrics.ForwardTimer`), which also sees what the model misses
  (padded image patches, kernels that favour some shapes, a slow device). It is the previous step's: on a GPU its
  events are complete only after this step's host sync, and reading them earlier would be a host sync of its own.

The digest of a step is sha1 over the ranks' own sha1s of their sample-id lists, in rank order: two runs trained
on the same samples in the same places exactly when their digests agree. Each rank's sha1 travels as five 32-bit
words, which float64 holds exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import torch

from modeling_llama3_siglip2.host_layout import host_to_device

HOST_FIELDS = ("tokens", "samples", "sample_ids", "samples_seen", "stop", "compiled", "work", "compute_ms")
DIGEST_WORDS = 5  # sha1's 160 bits


def sample_ids_digest(sample_ids: list) -> bytes:
    return hashlib.sha1(json.dumps(sample_ids, separators=(",", ":")).encode()).digest()


def straggler_ratio(values) -> float:
    """The largest value over the mean of all ranks', NaN (not measured) left out; NaN when no rank measured one.

    One process is its own mean: 1.0, measured or not."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 1:
        return 1.0
    values = values[torch.isfinite(values)]
    mean = float(values.mean()) if values.numel() else math.nan
    return float(values.max()) / mean if mean > 0 else math.nan


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """FSDP2's gradient norm is a DTensor; the step summary needs the plain value it stands for."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@dataclass
class StepSummary:
    """One step, summed over the ranks."""

    loss: float  # the global mean loss per target token (NaN if any rank's was not finite)
    grad_norm: float | None  # None where the backend clips inside its own step (DeepSpeed)
    finite: bool  # every rank's loss and the gradient norm are finite: the optimizer step may run
    loss_finite: bool  # every rank's loss is finite (the gradients may still have overflowed, in fp16)
    tokens: int  # real (non-pad) tokens
    samples: int
    sample_ids: int
    samples_seen: int  # samples the loaders have yielded since the run began (across resumes)
    skipped: list[int]  # examples skipped since the run began, by reason (the caller's order)
    stop: bool  # some rank received SIGTERM
    compiled: bool  # some rank compiled a graph during the step: all of them waited for it
    digest: str
    straggler_work: float  # the most modelled FLOPs a rank had over the ranks' mean
    straggler_compute: float  # the same for measured forward time, of the previous step (NaN: none measured)

    def record(self, step: int) -> dict:
        """The step's line in steps.jsonl (JSON has no NaN: a non-finite figure is null)."""
        return {"step": step, "loss": finite_or_none(self.loss), "digest": self.digest, "ids": self.sample_ids,
                "tokens": self.tokens, "straggler_work": finite_or_none(self.straggler_work),
                "straggler_compute": finite_or_none(self.straggler_compute)}


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def start_step_summary(accelerator, loss: torch.Tensor, grad_norm, *, tokens: int, samples: int, sample_ids: list,
                       samples_seen: int, skipped: list[int], stop: bool, work: float,
                       compute_ms: float, compiled: bool = False) -> PendingSummary:
    """Queue the all-gather of every rank's figures for the step and their copy to the host; `read()` waits for it.

    `work`: this rank's modelled FLOPs for the step; `compute_ms`: its forward time in the previous step, NaN if
    not measured (see the module doc)."""
    device = accelerator.device
    words = struct.unpack(f">{DIGEST_WORDS}I", sample_ids_digest(sample_ids))
    host = [tokens, samples, len(sample_ids), samples_seen, float(stop), float(compiled), work, compute_ms, *skipped,
            *words]
    on_device = [loss]
    if torch.is_tensor(grad_norm):
        on_device.append(whole(grad_norm))
    else:  # None where DeepSpeed clips inside its own step
        host.insert(0, math.nan if grad_norm is None else float(grad_norm))
    on_device = [value.detach().to(torch.float64).reshape(1) for value in on_device]
    vector = torch.cat([*on_device, host_to_device(torch.tensor(host, dtype=torch.float64), device)])
    rows = accelerator.gather(vector).view(accelerator.num_processes, -1)
    return PendingSummary(rows, skip_columns=len(skipped), norm_measured=grad_norm is not None)


class PendingSummary:
    """A step summary on its way to the host: the gathered rows on the device, their copy queued behind them.

    `found_inf()` is the skip decision left on the device, for an optimizer that takes it (fused AdamW): the host
    need not wait for the summary before queueing the optimizer step, nor the device for the host."""

    def __init__(self, rows: torch.Tensor, skip_columns: int, norm_measured: bool):
        self.rows, self.skip_columns, self.norm_measured = rows, skip_columns, norm_measured
        self.copy, self.copied = rows, None
        if rows.device.type == "cuda":  # the copy into pinned memory waits for nothing on the host
            self.copy = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            self.copy.copy_(rows, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def found_inf(self) -> torch.Tensor:
        """1.0 (skip the step) when any rank's loss or the gradient norm is not finite, else 0.0; on the device."""
        checked = self.rows[:, :2] if self.norm_measured else self.rows[:, :1]
        return (~torch.isfinite(checked).all()).to(torch.float32)

    def read(self) -> StepSummary:
        """Wait for the copy (the host sync) and sum the ranks' rows."""
        if self.copied is not None:
            self.copied.synchronize()
        return summarise(self.copy.cpu(), self.skip_columns, self.norm_measured)


def summarise(rows: torch.Tensor, skip_columns: int, norm_measured: bool) -> StepSummary:
    """The ranks' rows (one per rank, as `start_step_summary` lays them out) summed into the step's summary."""
    losses, norms = rows[:, 0], rows[:, 1]
    columns = {name: rows[:, 2 + i] for i, name in enumerate(HOST_FIELDS)}
    skip_start = 2 + len(HOST_FIELDS)
    skipped_by_rank = rows[:, skip_start : skip_start + skip_columns]
    rank_digests = rows[:, skip_start + skip_columns :].to(torch.int64).tolist()
    digest = hashlib.sha1(b"".join(struct.pack(f">{DIGEST_WORDS}I", *words) for words in rank_digests)).hexdigest()
    loss_finite = bool(torch.isfinite(losses).all())
    finite = loss_finite and (not norm_measured or bool(torch.isfinite(norms).all()))
    return StepSummary(
        loss=float(losses.sum()),
        grad_norm=float(norms.max()) if norm_measured else None,  # equal on all ranks: synchronised gradients
        finite=finite,
        loss_finite=loss_finite,
        tokens=int(columns["tokens"].sum()),
        samples=int(columns["samples"].sum()),
        sample_ids=int(columns["sample_ids"].sum()),
        samples_seen=int(columns["samples_seen"].sum()),
        skipped=[int(count) for count in skipped_by_rank.sum(dim=0).tolist()],
        stop=bool(columns["stop"].any()),
        compiled=bool(columns["compiled"].any()),
        digest=digest,
        straggler_work=straggler_ratio(columns["work"]),
        straggler_compute=straggler_ratio(columns["compute_ms"]),
    )
