"""One variant of the training benchmark, in this process only: warm up until steady, time the steady steps, write JSON.

`bench_train.py` starts one of these per variant and per repeat, so that nothing compiled, cached or allocated by
one variant reaches the next. The run:

1. builds the model (seed 0, the same weights in every variant) and the batches (the same seeded samples, in the
   same order, for every variant of a merge: packed variants all start from the same first batch);
2. warms up, one synchronised step at a time, until `SteadyState` holds: no compilation in the last `quiet` steps
   and the step time settled (at most `max_warmup` steps; a run that never settles says so);
3. times `steps` steps with device-clock marks between steps, on batches it has not seen (new image shapes, as real
   data brings), and records every compilation with its step: a compile inside the timed window flags the run;
4. optionally marks the phases of a few more steps and profiles a few more (`--profile-steps`).

Shape letters: B rows, S tokens per row, N images, L patches per (padded) image, P values per patch (3·p·p).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.bench_model import (
    TEXT_1B,
    TEXT_TINY,
    VISION_BASE,
    VISION_TINY,
    Clock,
    FlopCounts,
    bf16_matmul_rate,
    build_model,
    model_config,
)
from benchmarks.bench_variants import VARIANTS, Variant
from benchmarks.compile_watch import CompileWatch, SteadyState
from benchmarks.train_workload import (
    WORKLOADS,
    TokenIds,
    bucket_patch_length,
    make_samples,
    packed_batches,
    padded_batch,
)
from modeling_llama3_siglip2.efficient_ops import (
    compile_layers,
    packed_patch_length,
    use_decoder_attention,
    use_grouped_position_embeddings,
    use_packed_vision,
)
from modeling_llama3_siglip2.host_layout import HostBatchLayout
from processing.collator import IGNORE_INDEX, MultimodalPackingCollator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from train_lib.gc_policy import GarbageCollection

LOSS_CHUNK = 2048


def make_batches(variant: Variant, args, config, count: int) -> list:
    workload = args.workload
    per_batch = workload.batch_size if variant.is_baseline else 32 * workload.rows  # ~20 samples fill a row
    samples = make_samples(count * per_batch, workload, config,
                           seed=variant.merge)
    stream, pad = iter(samples), TokenIds(config.text_config.vocab_size).pad
    if variant.is_baseline:
        batches = [padded_batch([next(stream) for _ in range(workload.batch_size)], pad, variant.merge)
                   for _ in range(count)]
    else:
        seq_len = workload.long_seq_len if variant.long else workload.seq_len
        rows = 1 if variant.long else workload.rows
        batches = packed_batches(stream, MultimodalPackingCollator(seq_len, pad_token_id=pad), rows, count,
                                 variant.merge)
    if variant.vision_shapes == "bucket":
        batches = [bucket_patch_length(b, args.bucket) for b in batches]
    if variant.vision_shapes in ("bucket", "static"):
        # One batch of each encoder shape first (padded length, or packed length), so the warm-up compiles every
        # graph (a real run compiles them in its first minutes); the timed steps still come on unseen batches.
        firsts = {}
        for index, batch in enumerate(batches):
            firsts.setdefault(encoder_shape(batch, variant), index)
        primed = sorted(firsts.values())
        batches = [batches[i] for i in primed] + [b for i, b in enumerate(batches) if i not in set(primed)]
    return batches


def encoder_shape(batch, variant: Variant) -> int:
    """The length the vision encoder's compiled layers see: the padded L, or the packed sequence's length."""
    if variant.packed_vision:
        return packed_patch_length(int(batch.tensors["pixel_attention_mask"].sum()))
    return batch.tensors["pixel_values"].shape[1]


def liger_loss_fn():
    """Liger Kernel's fused linear cross-entropy on the positions that have a target (the same ones ours keeps)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def loss(model, tensors):
        inputs = {k: v for k, v in tensors.items() if k != "labels"}
        hidden_BSD = model.model(**inputs, use_cache=False).last_hidden_state
        targets = torch.nn.functional.pad(tensors["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        kept_M = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        hidden_MD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1]).index_select(0, kept_M)
        dtype = torch.get_autocast_dtype(hidden_BSD.device.type)
        with torch.autocast(hidden_BSD.device.type, enabled=False):  # Liger's kernels take one dtype, not autocast
            out = fused(model.lm_head.weight.to(dtype), hidden_MD.to(dtype), targets.index_select(0, kept_M))
        return out[0] if isinstance(out, tuple) else out

    return loss


def prepare(model, variant: Variant, args):
    """Apply the variant's optimisations; returns (loss function, note where something cannot run here)."""
    note = None
    if variant.flex and args.device.type == "cpu":
        note = "flex attention has no backward on the CPU: sdpa here"
    elif variant.flex:
        use_decoder_attention(model, "flex_attention")
    # The model installs the grouped resize by default; variants without it measure transformers' own loop.
    use_grouped_position_embeddings(model.model.vision_tower, enabled=variant.grouped_pos)
    model.config.loss_chunk_size = LOSS_CHUNK if variant.chunked_loss else 0
    if variant.packed_vision:
        use_packed_vision(model)
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant.compiled:
        options = {"backend": args.compile_backend}
        if variant.compile_mode and args.compile_backend == "inductor":
            options["mode"] = variant.compile_mode
        compile_layers(model, vision_shapes=variant.vision_shapes, **options)
    if variant.liger_loss:
        return liger_loss_fn(), note
    return (lambda m, tensors: m(**tensors, use_cache=False).loss), note


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q):  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9), "min": ordered[0],
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


class Stepper:
    """One training step: forward and loss under bf16 autocast, backward, fused AdamW; phase marks when profiling."""

    def __init__(self, model, loss_fn, device: torch.device, host_layout: bool = False):
        self.model, self.loss_fn, self.device, self.phases = model, loss_fn, device, None
        self.host_layout = host_layout
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def mark(self, name: str) -> None:
        if self.phases is not None:
            self.phases.mark(name)

    def __call__(self, batch) -> torch.Tensor:
        layout = contextlib.nullcontext()
        if self.host_layout:  # built from the host batch in every step, as the trainer does
            layout = self.model.host_layout(HostBatchLayout.of(batch.tensors, self.model.config))
        tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.tensors.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16), layout:
            loss = self.loss_fn(self.model, tensors)
        self.mark("backward")
        loss.backward()
        self.mark("optimizer")
        self.optimizer.step()
        self.mark("after_optimizer")
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def setup(args, batch_count: int):
    """(the variant's model, its `Stepper`, `batch_count` batches in pinned memory, a note or None)."""
    variant, device = VARIANTS[args.variant], args.device
    config = model_config(args.text, args.vision, variant.merge)
    batches = make_batches(variant, args, config, batch_count)
    if device.type == "cuda":
        for batch in batches:
            batch.tensors = {k: v.pin_memory() for k, v in batch.tensors.items()}
    model = build_model(config, device)
    loss_fn, note = prepare(model, variant, args)
    return model, Stepper(model, loss_fn, device, variant.host_layout), batches, note


def run(args) -> dict:
    variant, device = VARIANTS[args.variant], args.device
    ceiling = bf16_matmul_rate(device, 1024 if args.tiny else 8192)
    model, step_fn, batches, note = setup(args, args.max_warmup + args.steps + 2 * args.profile_steps)
    counts = FlopCounts.of(model)
    watch = CompileWatch().install()
    steady = SteadyState(args.min_warmup, args.quiet, args.tolerance)

    # Warm-up: one synchronised step at a time, until steady.
    collector = GarbageCollection(args.gc_every)
    losses, warm_seconds, started = [], [], time.perf_counter()
    for step, batch in enumerate(batches[: args.max_warmup]):
        watch.step, tick = step, time.perf_counter()
        losses.append(step_fn(batch))
        collector.step(step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        warm_seconds.append(time.perf_counter() - tick)
        if steady.reached(warm_seconds, watch.last_step_with_compile()):
            break
    warmup_steps = len(warm_seconds)
    is_steady = steady.reached(warm_seconds, watch.last_step_with_compile())
    time_to_steady = time.perf_counter() - started
    graphs_after_warmup = watch.snapshot()

    # The timed window: device-clock marks between steps, no host sync; batches the warm-up has not seen.
    timed = batches[warmup_steps : warmup_steps + args.steps]
    clock = Clock(device)
    clock.mark()
    for i, batch in enumerate(timed):
        watch.step = warmup_steps + i
        losses.append(step_fn(batch))
        collector.step(warmup_steps + i + 1)
        clock.mark()
    step_s = clock.intervals_s()
    window = (warmup_steps, warmup_steps + len(timed) - 1)
    in_window = watch.events_in(*window)
    graphs_after_window = watch.snapshot()

    profile = None
    if args.profile_steps:
        watch.step = window[1] + 1
        rest = batches[window[1] + 1 :]
        profile = profile_steps(step_fn, rest[: args.profile_steps], rest[args.profile_steps : 2 * args.profile_steps])
        profile["compiles_while_profiling"] = len(watch.events_in(window[1] + 1, 10**9))

    losses = [round(float(loss), 4) for loss in losses]
    if not all(math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    seconds = sum(step_s)
    flops = [counts.model_flops(b) for b in timed]
    real = [b.real_tokens for b in timed]
    seen = batches[: window[1] + 1]
    shapes = {tuple(b.tensors["pixel_values"].shape[:2]) for b in seen if "pixel_values" in b.tensors}
    return {
        "variant": dataclasses.asdict(variant), "workload": args.workload_name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "pid": os.getpid(),
        "torch": torch.__version__, "ceiling_flops": ceiling, "note": note,
        "steady": is_steady, "warmup_steps": warmup_steps, "time_to_steady_s": round(time_to_steady, 2),
        "first_step_s": round(warm_seconds[0], 3), "warmup_step_s": [round(s, 4) for s in warm_seconds],
        "compiles_in_window": len(in_window), "valid": is_steady and not in_window,
        "steps": len(step_s), "step_s": [round(s, 5) for s in step_s],
        "step_ms": {k: round(1e3 * v, 2) for k, v in percentiles(step_s).items()},
        "real_tokens_per_s": sum(real) / seconds, "tokens_per_s": sum(b.tokens for b in timed) / seconds,
        "images_per_s": sum(len(b.image_patches) for b in timed) / seconds,
        "model_flops": sum(flops), "seconds": seconds, "mfu": sum(flops) / seconds / ceiling,
        "mfu_6n": 6 * counts.all_params * sum(real) / seconds / ceiling,
        "mfu_per_step": {k: round(v, 4) for k, v in percentiles(
            [f / s / ceiling for f, s in zip(flops, step_s)]).items()},
        "model_tflop_per_step": sum(flops) / len(timed) / 1e12,
        "padding_fraction": 1 - sum(real) / sum(b.tokens for b in timed),
        "patch_padding_fraction": 1 - sum(sum(b.image_patches) for b in timed)
        / max(1, sum(b.padded_patches for b in timed)),
        "steps_seen": len(seen), "distinct_image_shapes": len(shapes),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        "graphs_after_warmup": graphs_after_warmup, "graphs_after_window": graphs_after_window,
        "compile": watch.summary(), "losses": losses, "profile": profile,
    }


def profile_steps(step_fn: Stepper, phase_batches: list, profile_batches: list) -> dict:
    """Phase marks over the first batches, then torch.profiler over the others (separately: the profiler's own host
    cost would stretch the phases)."""
    from benchmarks.step_profile import PhaseMarks, kernel_summary

    device = step_fn.device
    step_fn.phases = phases = PhaseMarks(step_fn.model, device)
    for batch in phase_batches:
        phases.start()
        step_fn(batch)
        phases.finish()
    step_fn.phases = None
    phases.remove()
    table = phases.table()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    clock = Clock(device)
    with torch.profiler.profile(activities=activities) as profiler:
        clock.mark()
        for batch in profile_batches:
            step_fn(batch)
        clock.mark()
        if device.type == "cuda":
            torch.cuda.synchronize()
    window_ms = 1e3 * sum(clock.intervals_s())
    return {"phases": table, "kernels": kernel_summary(profiler, len(profile_batches), window_ms)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, choices=list(VARIANTS))
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU: the same code path, in seconds")
    parser.add_argument("--workload", default="caption", choices=list(WORKLOADS))
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (default 2; long rows: 1)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (at least 30 for a figure to report)")
    parser.add_argument("--min-warmup", type=int, default=8)
    parser.add_argument("--max-warmup", type=int, default=60)
    parser.add_argument("--quiet", type=int, default=5, help="steady: no compile in this many steps, time settled")
    parser.add_argument("--tolerance", type=float, default=0.10, help="steady: median change allowed, as a fraction")
    parser.add_argument("--bucket", type=int, default=256, help="all+bucket: pad L to a multiple of this")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--profile-steps", type=int, default=0, help="after the window: phase marks and a profile")
    parser.add_argument("--gc-every", type=int, default=50, help="automatic gc off, gc.collect(1) every N steps, as "
                        "train.py does (0: Python's own schedule)")
    args = parser.parse_args(argv)
    args.text, args.vision = (TEXT_TINY, VISION_TINY) if args.tiny else (TEXT_1B, VISION_BASE)
    args.workload_name = args.workload
    args.workload = WORKLOADS[args.workload][1 if args.tiny else 0]
    if args.rows is not None:
        args.workload = dataclasses.replace(args.workload, rows=args.rows)
    args.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # a shared 2-core machine: one thread per process is faster than fighting
    # Static decoder graphs, and no automatic switch to dynamic shapes: every graph the run needs is one it asked for.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = 16
    result = run(args)
    with open(args.json, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: result[k] for k in ("variant", "steady", "warmup_steps", "time_to_steady_s",
                                             "compiles_in_window", "step_ms", "real_tokens_per_s", "mfu")}))


if __name__ == "__main__":
    main()
