"""Training throughput, MFU and peak memory of llama3-siglip2: the padded baseline, packed rows, and each optimisation.

Run (one H100, ~6-7 min):  python benchmarks/bench_train.py            (writes $OUT/bench_train.json when OUT is set)
Smoke test (CPU, <60 s):   python benchmarks/bench_train.py --tiny

The model is built from config with random weights: Llama-3.2-1B dimensions for the decoder (tied embeddings) and
siglip2-base-patch16-naflex for the vision tower. The workload is caption-like: one image of 64-256 patches at a random
aspect ratio, then a caption of 8-80 tokens. Images come as ready NaFlex patches (random values), so the GPU time is
all training. Every variant builds the same weights (seed 0), trains `--warmup` steps, then `--steps` timed steps with
bf16 autocast and fused AdamW. All variants run in the same process, against the same measured matmul ceiling.

Model FLOPs per step (what the step must compute; padding and logits nobody trains on are not counted):
    decoder    6 · N_dec · T_real        N_dec: the decoder layers' matmul weights; T_real: non-pad tokens
    lm_head    6 · V · D · T_target      logits are only needed where a label is
    vision     6 · N_vis · P_real        N_vis: patch embedding + encoder layers; P_real: valid patches
    projector  6 · N_proj · T_image
    attention  6 · layers · D · Σ l²     per sample of l tokens, causal (forward 2·D·l², backward twice that):
                                         the 12 · layers · D · S_eff per token of the usual formula, S_eff = l / 2
             + 12 · layers_v · D_v · Σ n²  per image of n patches, bidirectional
MFU = model FLOPs / step time / the bf16 matmul rate measured in this run. "MFU 6N" = 6 · all params · T_real, the
convention behind the issue's baseline figures, for comparison.

Shape letters: B rows, S tokens per row, N images, L patches per (padded) image, P values per patch (3·16·16).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_workload import (
    TINY_WORKLOAD,
    Batch,
    TokenIds,
    Workload,
    make_samples,
    packed_batches,
    padded_batch,
)
from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration
from modeling_llama3_siglip2.efficient_ops import (
    chunked_causal_lm_loss,
    compile_layers,
    grouped_resize_positional_embeddings,
    use_decoder_attention,
    use_grouped_position_embeddings,
)
from processing.collator import MultimodalPackingCollator

TEXT_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               tie_word_embeddings=True)
VISION_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=16, num_patches=256)
TEXT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
VISION_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   patch_size=4, num_patches=64)


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


def all_variants() -> list[Variant]:
    """Run order = table order, most telling first (a time budget may cut the tail): the cumulative ladder, the long
    rows, merge 2, the memory option, then single optimisations on packed for attribution."""
    full = dict(chunked_loss=True, grouped_pos=True, flex=True, compiled=True)
    return [
        Variant("baseline", packed=False),
        Variant("packed"),
        Variant("packed+loss", chunked_loss=True),
        Variant("packed+loss+pos", chunked_loss=True, grouped_pos=True),
        Variant("packed+loss+pos+flex", chunked_loss=True, grouped_pos=True, flex=True),
        Variant("all", **full),  # the line above, compiled
        Variant("all@long", **full, long=True),
        Variant("m2 baseline", merge=2, packed=False),
        Variant("m2 packed", merge=2),
        Variant("m2 all", merge=2, **full),
        Variant("all+ckpt", **full, checkpointing=True),
        Variant("packed+pos", grouped_pos=True),
        Variant("packed+flex", flex=True),
        Variant("packed+compile", compiled=True),
        Variant("packed+loss+pos+compile", chunked_loss=True, grouped_pos=True, compiled=True),
        Variant("baseline again", packed=False),  # the same variant twice: the spread is the noise
    ]


def build_model(text: dict, vision: dict, merge: int, device: torch.device) -> Llama3Siglip2ForConditionalGeneration:
    ids = TokenIds(text["vocab_size"])
    config = Llama3Siglip2Config(text_config=dict(text, pad_token_id=ids.pad), vision_config=vision,
                                 spatial_merge_size=merge)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama3Siglip2ForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.train()


@dataclass(frozen=True)
class FlopCounts:
    decoder_matmul: int
    lm_head: int
    vision_matmul: int
    projector: int
    text_layers: int
    text_width: int
    vision_layers: int
    vision_width: int
    all_params: int

    @classmethod
    def of(cls, model) -> FlopCounts:
        def matmul_weights(module, skip=()):
            return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and not any(s in n for s in skip))
        text, vision = model.config.text_config, model.config.vision_config
        return cls(matmul_weights(model.model.language_model.layers), model.lm_head.weight.numel(),
                   matmul_weights(model.model.vision_tower, skip=("position_embedding",)),
                   matmul_weights(model.model.multi_modal_projector), text.num_hidden_layers, text.hidden_size,
                   vision.num_hidden_layers, vision.hidden_size, sum(p.numel() for p in model.parameters()))

    def model_flops(self, batch: Batch) -> float:
        dense = 6 * (self.decoder_matmul * batch.real_tokens + self.lm_head * batch.target_tokens
                     + self.vision_matmul * sum(batch.image_patches) + self.projector * batch.image_tokens)
        attention = 6 * self.text_layers * self.text_width * sum(l * l for l in batch.sample_lengths)
        attention += 12 * self.vision_layers * self.vision_width * sum(n * n for n in batch.image_patches)
        return dense + attention


class Clock:
    """Timestamps that follow the device's queue: CUDA events there, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def bf16_matmul_rate(device: torch.device, size: int) -> float:
    """FLOP/s of a large bf16 matmul on random data (median of 10): the ceiling MFU is measured against."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    clock = Clock(device)
    for _ in range(10):
        clock.mark()
        a @ b
    clock.mark()
    return 2 * size**3 / sorted(clock.intervals_s())[4]


def to_device(tensors: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def training_loss(model, tensors: dict, chunked: bool) -> torch.Tensor:
    inputs = {k: v for k, v in tensors.items() if k != "labels"}
    if chunked:
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.lm_head.weight, tensors["labels"])
    return model(**inputs, labels=tensors["labels"], use_cache=False).loss


def prepare(model, variant: Variant, compile_backend: str) -> str | None:
    """Apply the variant's optimisations; returns a note where one cannot run here."""
    note = None
    if variant.flex and next(model.parameters()).device.type == "cpu":
        note = "flex attention has no backward on the CPU: sdpa here"
    elif variant.flex:
        use_decoder_attention(model, "flex_attention")
    # The model installs the grouped resize by default; variants without it measure transformers' own loop.
    use_grouped_position_embeddings(model.model.vision_tower, enabled=variant.grouped_pos)
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant.compiled:
        compile_layers(model, backend=compile_backend)
    return note


@dataclass
class Result:
    variant: dict
    seq_len: int = 0
    rows: int = 0
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    real_tokens_per_s: float = 0.0
    images_per_s: float = 0.0
    mfu: float = 0.0
    mfu_6n: float = 0.0
    peak_gib: float = 0.0
    leftover_gib: float = 0.0  # allocated before the variant built its model: what earlier variants left behind
    model_tflop_per_step: float = 0.0
    padding_fraction: float = 0.0
    warmup_s: float = 0.0
    loader_batches_per_s: float = 0.0  # collation alone, one core
    loader_headroom: float = 0.0  # how many times faster the collator makes batches than the step consumes them
    losses: list = field(default_factory=list)
    note: str | None = None
    error: str | None = None


def free_device_memory(device: torch.device) -> float:
    """Free what earlier variants left and restart the peak count; returns the GiB still allocated (should be ~0)."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    if torch.cuda.memory_allocated() > 2**30:
        # Compiled layers' caches might keep an old model alive; dropping them costs recompiles, not correctness.
        torch._dynamo.reset()
        gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def run_variant(variant: Variant, args, samples: dict, ceiling: float, device: torch.device) -> Result:
    workload = args.workload
    seq_len = workload.long_seq_len if variant.long else workload.seq_len
    rows = 1 if variant.long else workload.rows
    result = Result(asdict(variant), seq_len=seq_len if variant.packed else 0, rows=rows if variant.packed else 0)
    result.leftover_gib = free_device_memory(device)
    model = build_model(args.text, args.vision, variant.merge, device)
    result.note = prepare(model, variant, args.compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    counts = FlopCounts.of(model)

    count, stream = args.warmup + args.steps, itertools.cycle(samples[variant.merge])
    started = time.perf_counter()
    if variant.packed:
        collator = MultimodalPackingCollator(seq_len, pad_token_id=TokenIds(args.text["vocab_size"]).pad)
        batches = packed_batches(stream, collator, rows, count, variant.merge)
    else:
        pad = TokenIds(args.text["vocab_size"]).pad
        batches = [padded_batch([next(stream) for _ in range(workload.batch_size)], pad, variant.merge)
                   for _ in range(count)]
    result.loader_batches_per_s = count / (time.perf_counter() - started)
    if device.type == "cuda":
        for batch in batches:
            batch.tensors = {k: v.pin_memory() for k, v in batch.tensors.items()}

    clock, losses = Clock(device), []
    warmup_started = time.perf_counter()
    for step, batch in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            result.warmup_s = time.perf_counter() - warmup_started
            clock.mark()
        tensors = to_device(batch.tensors, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = training_loss(model, tensors, variant.chunked_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step >= args.warmup:
            clock.mark()
    seconds = sum(clock.intervals_s())
    timed = batches[args.warmup:]
    result.losses = [round(float(loss), 4) for loss in losses]
    if not all(math.isfinite(loss) for loss in result.losses):
        raise FloatingPointError(f"non-finite loss: {result.losses}")
    real_tokens = sum(b.real_tokens for b in timed)
    result.step_ms = 1e3 * seconds / len(timed)
    result.tokens_per_s = sum(b.tokens for b in timed) / seconds
    result.real_tokens_per_s = real_tokens / seconds
    result.images_per_s = sum(len(b.image_patches) for b in timed) / seconds
    flops = sum(counts.model_flops(b) for b in timed)
    result.model_tflop_per_step = flops / len(timed) / 1e12
    result.mfu = flops / seconds / ceiling
    result.mfu_6n = 6 * counts.all_params * real_tokens / seconds / ceiling
    result.padding_fraction = 1 - real_tokens / sum(b.tokens for b in timed)
    result.loader_headroom = result.loader_batches_per_s * seconds / len(timed)
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return result


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def parity_checks(args, samples: dict, device: torch.device) -> dict:
    """On this device and in bf16 autocast: each optimisation against the plain path on one packed batch."""
    model = build_model(args.text, args.vision, 1, device)
    collator = MultimodalPackingCollator(args.workload.seq_len, pad_token_id=TokenIds(args.text["vocab_size"]).pad)
    batch = packed_batches(iter(samples[1]), collator, args.workload.rows, 1, 1)[0]
    tensors = to_device(batch.tensors, device)
    watched = {"lm_head": model.lm_head.weight,
               "decoder.0.down_proj": model.model.language_model.layers[0].mlp.down_proj.weight,
               "vision.0.fc1": model.model.vision_tower.encoder.layers[0].mlp.fc1.weight}

    def loss_and_grads(chunked: bool, backward: bool = True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(backward):
            loss = training_loss(model, tensors, chunked)
        if not backward:
            return loss, {}
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in watched.items()}

    def compare(loss, grads):
        return {"loss": relative_error(loss, plain_loss), **{k: relative_error(grads[k], plain_grads[k]) for k in grads}}

    plain_loss, plain_grads = loss_and_grads(False)
    checks = {"chunked_loss": compare(*loss_and_grads(True))}
    use_decoder_attention(model, "flex_attention")
    # Flex attention has no CPU backward: there, the forward alone.
    checks["flex_attention"] = compare(*loss_and_grads(False, backward=device.type == "cuda"))

    embeddings = model.model.vision_tower.embeddings
    grid = embeddings.position_embedding.weight.reshape(embeddings.position_embedding_size,
                                                        embeddings.position_embedding_size, -1).detach()
    shapes, L = tensors["spatial_shapes"], tensors["pixel_values"].shape[1]
    want = embeddings.resize_positional_embeddings(grid, shapes, L)
    got = grouped_resize_positional_embeddings(grid, shapes, L)
    checks["grouped_pos"] = {"max_abs": float((got - want).abs().max()), "relative": relative_error(got, want)}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            grouped_resize_positional_embeddings(grid, shapes, L)
            checks["grouped_pos"]["host_syncs"] = 0
        except RuntimeError as error:
            checks["grouped_pos"]["host_syncs"] = f"at least one: {error}"[:200]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return checks


def table_lines(results: list[Result]) -> list[str]:
    """One line per variant; "x base" is real tokens/s over the same merge's padded baseline."""
    baseline = {r.variant["merge"]: r.real_tokens_per_s for r in results if not r.variant["packed"] and not r.error}
    head = (f"{'variant':22} {'k':>1} {'rows':>7} {'step ms':>8} {'tok/s':>7} {'real/s':>7} {'x base':>6} "
            f"{'img/s':>6} {'MFU':>6} {'MFU 6N':>6} {'peak GiB':>8} {'pad':>4} {'loader':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        v = r.variant
        shape = f"{r.rows}x{r.seq_len}" if v["packed"] else "padded"
        if r.error:
            lines.append(f"{v['name']:22} {v['merge']:>1} {shape:>7}  {r.error[:90]}")
            continue
        ratio = r.real_tokens_per_s / baseline[v["merge"]] if v["merge"] in baseline else float("nan")
        lines.append(
            f"{v['name']:22} {v['merge']:>1} {shape:>7} {r.step_ms:8.1f} {r.tokens_per_s:7.0f} "
            f"{r.real_tokens_per_s:7.0f} {ratio:6.2f} {r.images_per_s:6.0f} {100 * r.mfu:5.1f}% "
            f"{100 * r.mfu_6n:5.1f}% {r.peak_gib:8.1f} {100 * r.padding_fraction:3.0f}% {r.loader_headroom:5.0f}x"
            + (" *" if r.note else ""))
    lines += [f"* {note}" for note in sorted({r.note for r in results if r.note})]
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU: the same code path, in seconds")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (3; tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (10; tiny: 1)")
    parser.add_argument("--variants", default="all", help="comma-separated names (see all_variants), or 'all'")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; tiny: aot_eager)")
    parser.add_argument("--time-budget", type=float, default=450, help="seconds; variants that would end past it are skipped")
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (2; long rows: 1)")
    parser.add_argument("--skip-checks", action="store_true", help="skip the parity checks before the timings")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/bench_train.json when OUT is set)")
    args = parser.parse_args(argv)
    args.text, args.vision = (TEXT_TINY, VISION_TINY) if args.tiny else (TEXT_1B, VISION_BASE)
    args.workload = TINY_WORKLOAD if args.tiny else Workload()
    if args.rows is not None:
        args.workload = dataclasses.replace(args.workload, rows=args.rows)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 10)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_train.json")
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    # Each variant builds a fresh model and may recompile the layers (other shapes, flex, checkpointing). Each shape
    # gets a static decoder graph, as a run with one row shape would; the vision layers are dynamic anyway.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    torch._dynamo.config.automatic_dynamic_shapes = False
    chosen = all_variants() if args.variants == "all" else [v for v in all_variants() if v.name in args.variants.split(",")]
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (Python 3.10 has no datetime.UTC)
    env = {"date": now.isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "command": " ".join([sys.executable, *sys.argv]),
           "workload": asdict(args.workload), "warmup": args.warmup, "steps": args.steps}
    print(json.dumps(env), flush=True)

    configs = {merge: Llama3Siglip2Config(text_config=args.text, vision_config=args.vision, spatial_merge_size=merge)
               for merge in sorted({v.merge for v in chosen} | {1})}
    samples = {merge: make_samples(4000 if not args.tiny else 400, args.workload, config, seed=merge)
               for merge, config in configs.items()}
    ceiling = bf16_matmul_rate(device, 1024 if args.tiny else 8192)
    print(f"bf16 matmul ceiling: {ceiling / 1e12:.3g} TFLOP/s", flush=True)
    try:
        checks = {} if args.skip_checks else parity_checks(args, samples, device)
    except Exception as error:  # noqa: BLE001  (the timings still run; the failure is reported with them)
        traceback.print_exc(limit=3)
        checks = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    print(f"[{time.perf_counter() - started:6.0f} s] parity checks (relative errors): {json.dumps(checks)}", flush=True)

    results = []
    for variant in chosen:
        # A rough cost, so that the run ends inside the budget: a compiled variant may compile new layer graphs.
        expected_s = (90 if variant.compiled else 20) * (0.1 if args.tiny else 1)
        if time.perf_counter() - started + expected_s > args.time_budget:
            results.append(Result(asdict(variant), error=f"skipped: would end past the {args.time_budget:.0f} s budget"))
            continue
        try:
            result = run_variant(variant, args, samples, ceiling, device)
        except Exception as error:  # noqa: BLE001  (an OOM or a backend failure ends this variant, not the run)
            traceback.print_exc(limit=3)
            result = Result(asdict(variant), error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
        results.append(result)
        print(f"[{time.perf_counter() - started:6.0f} s] {variant.name}: {json.dumps(asdict(result))}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"env": env, "ceiling_flops": ceiling, "checks": checks,
                           "results": [asdict(r) for r in results]}, f, indent=1)
    summary = (f"{env['date']}: {time.perf_counter() - started:.0f} s on {env['device']}, torch {env['torch']}, "
               f"transformers {env['transformers']}, bf16 matmul ceiling {ceiling / 1e12:.3g} TFLOP/s measured; "
               f"MFU counts model FLOPs (see the docstring); loader = collation rate / step rate")
    lines = table_lines(results)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"`{env['command']}`\n\n{summary}\n\n```\n" + "\n".join(lines) + "\n```\n")
    print("\n" + summary)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
