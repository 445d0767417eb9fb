"""The training benchmark's variants: what each one switches on. No torch import, so the driver starts in no time.

Each variant runs in a process of its own (`train_worker.py`), so nothing one variant compiled, cached or left in
the allocator reaches another. The names are what `bench_train.py --variants` takes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    merge: int = 1
    packed: bool = True
    chunked_loss: bool = False
    grouped_pos: bool = False
    flex: bool = False
    compiled: bool = False
    checkpointing: bool = False
    long: bool = False  # rows of long_seq_len, one per batch: the same tokens per step, longer rows
    liger_loss: bool = False  # Liger Kernel's fused linear cross-entropy instead of our chunked loss
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune-no-cudagraphs"
    vision_shapes: str = "dynamic"  # encoder layers: "dynamic" (all dims symbolic) or "bucket" (see train_worker)
    packed_vision: bool = False  # the vision tower over one sequence of all valid patches (static shapes per length)
    # The batch's image grids and target positions read on the host before it moves (`HostBatchLayout`), as
    # examples/train.py does: without it the forward reads them back from the GPU, two host syncs a step.
    host_layout: bool = False

    @property
    def is_baseline(self) -> bool:
        return not self.packed


FULL = dict(chunked_loss=True, grouped_pos=True, flex=True, compiled=True, host_layout=True)
VARIANTS = {
    v.name: v
    for v in [
        Variant("baseline", packed=False),
        Variant("packed"),
        Variant("packed+loss", chunked_loss=True),
        Variant("packed+loss+pos", chunked_loss=True, grouped_pos=True),
        Variant("packed+loss+pos+flex", chunked_loss=True, grouped_pos=True, flex=True),
        Variant("all", **FULL),  # the line above, with compiled layers: what examples/train.py runs on a GPU
        # Candidates on top of "all", one at a time.
        Variant("all+liger", **{**FULL, "chunked_loss": False}, liger_loss=True),
        Variant("all+autotune", **FULL, compile_mode="max-autotune-no-cudagraphs"),
        Variant("all+bucket", **FULL, vision_shapes="bucket"),
        Variant("all+vpack", **FULL, packed_vision=True, vision_shapes="static"),
        Variant("all+ckpt", **FULL, checkpointing=True),
        Variant("all@long", **FULL, long=True),
        # Merge 2: four times fewer image tokens in the decoder.
        Variant("m2 baseline", merge=2, packed=False),
        Variant("m2 packed", merge=2),
        Variant("m2 all", merge=2, **FULL),
        # One optimisation at a time on packed rows, for attribution.
        Variant("packed+pos", grouped_pos=True),
        Variant("packed+flex", flex=True),
        Variant("packed+compile", compiled=True),
    ]
}

# What `--variants standard` runs: the ladder, each step on top of the one before.
STANDARD = ["baseline", "packed", "packed+loss", "packed+loss+pos", "packed+loss+pos+flex", "all"]


def parse_variant_names(text: str) -> list[str]:
    """'standard', 'every', or comma-separated names; unknown names are an error that lists the known ones."""
    if text == "standard":
        return list(STANDARD)
    if text == "every":
        return list(VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return names
