"""Resuming a run from a checkpoint, also on another number of processes.

Same world size: everything is restored as saved (weights, optimizer, scheduler, each rank's RNG streams, each
rank's data position), and the run goes on exactly as if never stopped.

Another world size:
    * weights, optimizer and scheduler: accelerate's `load_state` reads DDP's single copy on any world size, and
      FSDP2's sharded state through torch.distributed.checkpoint, which re-shards on load;
    * data: every rank's saved loader state goes to `PackedDataLoader.load_state_dicts`, which deals the epoch's
      unconsumed samples to the new ranks (each sample once);
    * RNG: accelerate keeps one file per saved rank (`random_states_<rank>.pkl`) and, on a rank without one, skips
      it silently; mapping old ranks' streams onto new ranks would be arbitrary, so every rank is re-seeded from
      (seed, step, rank) instead, and accelerate's micro-batch counter is set alike on every rank;
    * DeepSpeed ZeRO: each rank's partition of the optimizer state (under ZeRO-3 of the weights too) is its own
      file, which DeepSpeed cannot re-partition on load: a clear error points to its universal-checkpoint tool.
"""

from __future__ import annotations

import numpy as np
from accelerate.utils import set_seed

from .checkpoints import load_trainer_state


def saved_world_size(trainer_state: dict) -> int:
    # Checkpoints from before "world_size" was recorded hold one data state per process.
    return int(trainer_state.get("world_size") or len(trainer_state["data"]))


def check_reshardable(accelerator, checkpoint: str, saved: int) -> None:
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or saved == accelerator.num_processes:
        return
    raise ValueError(
        f"{checkpoint} was saved by DeepSpeed ZeRO-{plugin.zero_stage} on {saved} processes and this run has "
        f"{accelerator.num_processes}. ZeRO keeps each rank's partition of the optimizer state (under ZeRO-3 of the "
        "weights too) in that rank's own file, and DeepSpeed cannot re-partition them when loading. Resume on "
        f"{saved} processes, or convert {checkpoint}/pytorch_model with DeepSpeed's universal-checkpoint tool "
        "(deepspeed/checkpoint/ds_to_universal.py: python -m deepspeed.checkpoint.ds_to_universal --input_folder "
        "IN --output_folder OUT) and load the result with \"load_universal\": true in the \"checkpoint\" section of "
        "the DeepSpeed config."
    )


def resume_from(accelerator, checkpoint: str, pipeline, seed: int) -> dict:
    """Restore the model, optimizer, scheduler, RNG and data position; return the saved trainer state."""
    state = load_trainer_state(checkpoint)
    saved = saved_world_size(state)
    check_reshardable(accelerator, checkpoint, saved)
    # The data first: it is cheap, and a stream that cannot be re-dealt fails before the weights are read.
    pipeline.load_state_dicts(state["data"])
    accelerator.load_state(checkpoint)
    if saved != accelerator.num_processes:
        reseed(seed, state["step"], accelerator.process_index)
        accelerator.step = state["step"] * accelerator.gradient_accumulation_steps
        accelerator.print(f"resuming {checkpoint} (saved by {saved} processes) on {accelerator.num_processes}: "
                          "the data is re-dealt and the RNG streams re-seeded")
    return state


def reseed(seed: int, step: int, rank: int) -> None:
    """Python, NumPy and torch (all devices) RNGs from (seed, step, rank): distinct per rank and per resume."""
    set_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
