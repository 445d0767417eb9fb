"""Resumable checkpoints: accelerate's `save_state`, plus the data position and the run's counters, written atomically.

A checkpoint is written to `checkpoints/.partial-step-N/` and renamed to `checkpoints/step-N/` only once complete,
so a folder named `step-N` is always whole; a run killed mid-save leaves a `.partial-*` folder that resume ignores.
The data pipeline's position and the counters are JSON (`trainer_state.json`): nothing here is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil

STEP_FOLDER = re.compile(r"^step-(\d+)$")
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = STEP_FOLDER.match(name)
        if match and os.path.exists(os.path.join(root, name, TRAINER_STATE)):
            steps.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(steps)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """'latest' → the newest complete checkpoint (or None to start fresh); a path → that checkpoint, checked."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.exists(os.path.join(resume_from_checkpoint, TRAINER_STATE)):
        raise ValueError(f"{resume_from_checkpoint} is not a complete checkpoint (no {TRAINER_STATE})")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict, keep: int) -> str:
    """Write step-N atomically on every process's behalf; keep only the newest `keep` complete checkpoints."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f"{PARTIAL_PREFIX}step-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial, safe_serialization=True)
    if accelerator.is_main_process:
        with open(os.path.join(partial, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        return json.load(f)
