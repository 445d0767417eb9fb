"""`--profile_steps N`: torch.profiler over the run's last N steps, on every rank, written beside the report.

What the benchmark's profile (benchmarks/step_profile.py) cannot show is the trainer's own step: its data loader,
host copies, step summary and bookkeeping between the model's kernels. Each rank writes
`profile/rank{R}.trace.json.gz` (open it in Perfetto or chrome://tracing) and `profile/rank{R}.txt`, its operators
by host time and by device time, and the loop's own phases (`trainer/...` ranges: next batch, forward and backward,
step summary, where the host waits for the device, optimizer, bookkeeping). The last steps are the steady ones:
compilation is over by then.
"""

from __future__ import annotations

import os

import torch

TABLE_ROWS = 30


class LastStepsProfiler:
    """Starts before step `max_steps - steps + 1` and writes its files when the loop ends (also after a stop)."""

    def __init__(self, steps: int, max_steps: int, output_dir: str, rank: int, device: torch.device):
        self.first_step = max_steps - steps + 1 if steps > 0 else None
        self.folder, self.rank = os.path.join(output_dir, "profile"), rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = None
        self.steps = 0

    def before_step(self, step: int) -> None:
        """`step`: the number of the step about to run (counted from 1)."""
        if self.first_step is not None and self.profiler is None and step >= self.first_step:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.start()
        if self.profiler is not None:
            self.steps += 1

    def finish(self) -> str | None:
        """Stop and write this rank's files; their folder, or None when nothing was profiled."""
        if self.profiler is None:
            return None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.profiler.stop()
        os.makedirs(self.folder, exist_ok=True)
        stem = os.path.join(self.folder, f"rank{self.rank}")
        self.profiler.export_chrome_trace(f"{stem}.trace.json.gz")
        averages = self.profiler.key_averages()
        device_key = "self_device_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
        with open(f"{stem}.txt", "w") as table:
            table.write(f"rank {self.rank}: the last {self.steps} steps; totals over them\n\n")
            table.write("The loop's phases (host time including what they call, ms):\n")
            phases = sorted((e for e in averages if e.key.startswith("trainer/")), key=lambda e: e.key)
            table.writelines(f"  {e.key:<28} {e.cpu_time_total / 1e3:10.1f}  ({e.count} calls)\n" for e in phases)
            table.write("\n")
            table.write("By host (CPU) time, self:\n")
            table.write(averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS))
            if device_key != "self_cpu_time_total":
                table.write("\nBy device time, self:\n")
                table.write(averages.table(sort_by=device_key, row_limit=TABLE_ROWS))
        self.profiler = None
        return self.folder
