"""A 2-process CPU (gloo) job for tests/test_distributed_checkpoints.py, launched with torchrun: a tiny model and
optimizer checkpointed with `save_checkpoint` while one rank writes slowly, hangs mid-save (the test kills it), or
runs out of disk. Each rank writes what it saw to `<output_dir>/report-<phase>-rank<R>.json`.

Phases:
    save      steps 1-3, a checkpoint each; the slow rank sleeps before writing its part, and at --hang_at_step it
              writes its pid to `<output_dir>/hanging.pid` and sleeps until killed.
    resume    resume from `latest`, then save step 3 again, then step 4 with the slow rank out of disk.
    per_node  one process per "node", each with its own disk (`<output_dir>/node<N>`), save_on_each_node: save
              steps 1-2, then node 1 loses its step-2 before the rename; both nodes must resume from step 1.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from train_lib.checkpoints import (  # noqa: E402
    PARTIAL_PREFIX,
    CheckpointDiskFullError,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
)


def slow_down(accelerator, rank: int, seconds: float, hang_at_step: int | None, pid_file: str, steps: list[int],
              disk_full_at_step: int | None = None):
    """Wrap accelerate's writer so that `rank` is slow (or hangs, or finds the disk full) while the others write."""
    import accelerate.accelerator

    original = accelerate.accelerator.save_accelerator_state

    def save_accelerator_state(*args, **kwargs):
        if accelerator.process_index == rank:
            if steps[-1] == hang_at_step:
                with open(pid_file, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)
            if steps[-1] == disk_full_at_step:
                raise OSError(errno.ENOSPC, "No space left on device")
            time.sleep(seconds)
        return original(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = save_accelerator_state


def fingerprint(model, optimizer) -> dict:
    """Weights, Adam moments and this process's torch RNG state, hashed: equal only if restored bit for bit."""
    digest = hashlib.sha256()
    for tensor in [*model.state_dict().values(), *(v for s in optimizer.state_dict()["state"].values()
                                                    for v in s.values() if torch.is_tensor(v))]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"weights_and_optimizer": digest.hexdigest(),
            "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--phase", choices=["save", "resume", "per_node"], required=True)
    parser.add_argument("--slow_rank", type=int, default=1)
    parser.add_argument("--slow_seconds", type=float, default=0.0)
    parser.add_argument("--hang_at_step", type=int, default=None)
    args = parser.parse_args()

    per_node = args.phase == "per_node"
    output_dir = os.path.join(args.output_dir, f"node{os.environ['GROUP_RANK']}") if per_node else args.output_dir
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(save_on_each_node=per_node))
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    steps: list[int] = [0]
    slow_down(accelerator, args.slow_rank, args.slow_seconds, args.hang_at_step,
              os.path.join(args.output_dir, "hanging.pid"), steps,
              disk_full_at_step=4 if args.phase == "resume" else None)
    report: dict = {"rank": rank, "saved": {}}

    def train_and_save(step: int) -> None:
        generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        accelerator.backward(model(torch.randn(4, 8, generator=generator)).pow(2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        steps.append(step)
        save_checkpoint(accelerator, output_dir, step, {"step": step}, keep=2)
        report["saved"][step] = fingerprint(model, optimizer)

    def write_report():
        with open(os.path.join(args.output_dir, f"report-{args.phase}-rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)

    if args.phase in ("save", "per_node"):
        for step in (1, 2) if per_node else (1, 2, 3):
            train_and_save(step)
            write_report()  # before the next save, which may be the one that hangs
    if per_node:
        report["own_files"] = sorted(os.listdir(os.path.join(output_dir, "checkpoints", "step-2")))
        if rank == 1:  # node 1 was killed before its rename: its step-2 is still partial
            root = os.path.join(output_dir, "checkpoints")
            os.rename(os.path.join(root, "step-2"), os.path.join(root, f"{PARTIAL_PREFIX}step-2"))
        accelerator.wait_for_everyone()
    if args.phase in ("resume", "per_node"):
        resume_from = resolve_resume("latest", output_dir, accelerator)
        accelerator.load_state(resume_from)
        report["resumed_from"] = resume_from
        report["resumed_step"] = load_trainer_state(resume_from)["step"]
        report["resumed"] = fingerprint(model, optimizer)
    if args.phase == "resume":
        train_and_save(3)
        try:
            train_and_save(4)
        except CheckpointDiskFullError as error:
            report["disk_full_error"] = str(error)
        report["checkpoints_after"] = sorted(os.listdir(os.path.join(output_dir, "checkpoints")))
    write_report()
    accelerator.end_training()


if __name__ == "__main__":
    main()
