"""Training throughput, MFU, compile time and compiled-graph counts of llama3-siglip2: one fresh process per variant.

    python benchmarks/bench_train.py                       # one H100/H200: the ladder, baseline twice, the profile
    python benchmarks/bench_train.py --variants all,all+liger --graph-check
    python benchmarks/bench_train.py --tiny                # CPU smoke run of the same driver and workers

Each variant, and each repeat of it, runs in a process of its own (`train_worker.py`): compiled graphs, flex kernels,
allocator state and cuBLAS choices of one variant cannot reach another, so a figure does not depend on what ran
before it. The padded baseline runs at least twice (`--baseline-runs`); speed-ups are against the faster run. Each
worker warms up until steady (no compilation for `--quiet` steps and the step time settled), then times `--steps`
steps on batches it has not seen; a compilation inside the timed window marks the row invalid (`!`). The inductor
and Triton caches are fresh for this run and shared by its processes (`--cold-compile`: fresh for each process), so
a compile time says whether it hit the cache.

`--graph-check` adds runs on images that vary as real ones do (64-1024 patches, so the padded length L and the image
count N change every step), with the encoder compiled with dynamic shapes and with L padded to buckets, and reports
the number of compiled graphs after all their steps. `--profile VARIANT` (default: all) adds phase marks and a
torch.profiler summary of a few steady steps to that variant's run.

Writes to --out (default $OUT): bench_train.json (everything), bench_train.md (the tables), bench_train.log (every
worker's output). The model, workload and FLOP formula: see bench_model.py and train_workload.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_report import markdown_report
from benchmarks.bench_variants import VARIANTS, parse_variant_names

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")
# Rough seconds per run on one H100 (start-up, batches, compile, warm-up, 40 steps), to keep inside --time-budget.
EXPECTED_S = {"eager": 40, "compiled": 75, "autotune": 240}


@dataclass
class Run:
    label: str
    variant: str
    workload: str = "caption"
    repeat: int = 1
    profile: bool = False
    result: dict | None = None
    error: str | None = None
    wall_s: float = 0.0
    timeout: float = 300.0
    extra: list = field(default_factory=list)

    def expected_s(self, tiny: bool) -> float:
        v = VARIANTS[self.variant]
        kind = "autotune" if v.compile_mode else "compiled" if v.compiled else "eager"
        return EXPECTED_S[kind] * (0.25 if tiny else 1)


def plan_runs(args) -> list[Run]:
    """In the order given, with the graph check after them; the last baseline run goes to the very end (and its time
    is kept in reserve), so that any drift over the session shows between the two baseline runs."""
    runs = []
    for name in parse_variant_names(args.variants):
        count = args.baseline_runs if VARIANTS[name].is_baseline else args.repeats
        runs += [Run(name if count == 1 else f"{name} #{i + 1}", name, repeat=i + 1) for i in range(count)]
    if args.profile != "none":
        target = next((r for r in runs if r.variant == args.profile), None)
        if target is None:
            runs.append(target := Run(f"{args.profile} (profiled)", args.profile))
        target.profile = True
    if args.graph_check:  # before the slow autotuning variants, which the budget may skip
        at = next((i for i, r in enumerate(runs) if VARIANTS[r.variant].compile_mode), len(runs))
        runs[at:at] = [Run("all, varied images", "all", workload="varied"),
                       Run("all+bucket, varied images", "all+bucket", workload="varied")]
    baselines = [r for r in runs if VARIANTS[r.variant].is_baseline]
    if len(baselines) > 1:
        runs.remove(baselines[-1])
        runs.append(baselines[-1])
    return runs


def worker_command(run: Run, args, json_path: str) -> list[str]:
    command = [sys.executable, WORKER, "--variant", run.variant, "--json", json_path, "--workload", run.workload,
               "--steps", str(args.steps), "--min-warmup", str(args.min_warmup), "--max-warmup", str(args.max_warmup),
               "--quiet", str(args.quiet), "--tolerance", str(args.tolerance), "--bucket", str(args.bucket),
               "--compile-backend", args.compile_backend]
    if args.tiny:
        command.append("--tiny")
    if args.rows:
        command += ["--rows", str(args.rows)]
    if run.profile:
        command += ["--profile-steps", str(args.profile_steps)]
    return command + run.extra


def execute(run: Run, args, cache_dir: str, log) -> Run:
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ)
        cache = tempfile.mkdtemp(dir=folder) if args.cold_compile else cache_dir
        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   PYTHONUNBUFFERED="1")
        json_path = os.path.join(folder, "result.json")
        started = time.perf_counter()
        try:
            finished = subprocess.run(worker_command(run, args, json_path), capture_output=True, text=True, env=env,
                                      timeout=run.timeout, check=False)
            output, code = finished.stdout + finished.stderr, finished.returncode
        except subprocess.TimeoutExpired as error:
            output = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
            code = f"timeout after {run.timeout:.0f} s"
        run.wall_s = time.perf_counter() - started
        log.write(f"\n===== {run.label} ({run.workload}): exit {code}, {run.wall_s:.0f} s\n{output[-20000:]}\n")
        log.flush()
        if code == 0 and os.path.exists(json_path):
            with open(json_path) as f:
                run.result = json.load(f)
        else:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            run.error = f"exit {code}: " + (lines[-1][:300] if lines else "no output")
    return run


def summarise(runs: list[Run]) -> dict:
    """One ceiling for every MFU (the median the workers measured), and each row against the faster baseline."""
    done = [r for r in runs if r.result]
    ceilings = [r.result["ceiling_flops"] for r in done]
    ceiling = statistics.median(ceilings) if ceilings else float("nan")
    baselines: dict[tuple, list[float]] = {}
    for r in done:
        if r.result["variant"]["packed"] is False:
            baselines.setdefault((r.result["variant"]["merge"], r.workload), []).append(r.result["real_tokens_per_s"])
    for r in done:
        res = r.result
        res["mfu_common"] = res["model_flops"] / res["seconds"] / ceiling
        best = baselines.get((res["variant"]["merge"], r.workload))
        res["speedup_vs_faster_baseline"] = res["real_tokens_per_s"] / max(best) if best else None
    spread = {f"merge {m}, {w}": {"runs_real_tokens_per_s": [round(v) for v in values],
                                  "spread": (max(values) - min(values)) / min(values)}
              for (m, w), values in baselines.items()}
    return {"ceiling_flops": ceiling, "ceiling_range": [min(ceilings), max(ceilings)] if ceilings else None,
            "baselines": spread}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU: the same driver and workers")
    parser.add_argument("--variants", default="standard", help="'standard', 'every', or names from bench_variants.py")
    parser.add_argument("--baseline-runs", type=int, default=2, help="separate processes per baseline variant")
    parser.add_argument("--repeats", type=int, default=1, help="separate processes per other variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (40; tiny: 3)")
    parser.add_argument("--min-warmup", type=int, default=None, help="(8; tiny: 2)")
    parser.add_argument("--max-warmup", type=int, default=None, help="(60; tiny: 6)")
    parser.add_argument("--quiet", type=int, default=None, help="steady: steps with no compile (5; tiny: 1)")
    parser.add_argument("--tolerance", type=float, default=None, help="steady: median change allowed (0.1; tiny: 1)")
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (2)")
    parser.add_argument("--bucket", type=int, default=None, help="all+bucket: pad L to a multiple of this (256; tiny 64)")
    parser.add_argument("--profile", default="all", help="the variant whose run also profiles; 'none' for none")
    parser.add_argument("--profile-steps", type=int, default=None, help="steps with phase marks, then as many profiled")
    parser.add_argument("--graph-check", action="store_true", help="also run all and all+bucket on varied images")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; tiny: eager)")
    parser.add_argument("--cold-compile", action="store_true", help="fresh inductor/Triton caches for every process")
    parser.add_argument("--time-budget", type=float, default=510, help="seconds; later runs that would not fit skip")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds per worker (300; tiny: 120)")
    parser.add_argument("--jobs", type=int, default=1, help="workers at once (for CPU smoke runs only: timings share)")
    parser.add_argument("--out", default=None, help="folder for the JSON, markdown and log (default $OUT or .)")
    args = parser.parse_args(argv)
    tiny_or = lambda value, gpu, tiny: value if value is not None else (tiny if args.tiny else gpu)
    args.steps = tiny_or(args.steps, 40, 3)
    args.min_warmup = tiny_or(args.min_warmup, 8, 2)
    args.max_warmup = tiny_or(args.max_warmup, 60, 6)
    args.quiet = tiny_or(args.quiet, 5, 1)
    args.tolerance = tiny_or(args.tolerance, 0.10, 1.0)
    args.bucket = tiny_or(args.bucket, 256, 64)
    args.profile_steps = tiny_or(args.profile_steps, 5, 2)
    args.compile_backend = tiny_or(args.compile_backend, "inductor", "eager")
    args.run_timeout = tiny_or(args.run_timeout, 300, 120)
    args.out = args.out or os.environ.get("OUT") or "."
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs, started = plan_runs(args), time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (Python 3.10 has no datetime.UTC)
    env = {"date": now.isoformat(timespec="seconds"), "command": " ".join([sys.executable, *sys.argv]),
           "steps": args.steps, "warmup": [args.min_warmup, args.max_warmup], "quiet": args.quiet,
           "tolerance": args.tolerance, "compile_backend": args.compile_backend, "cold_compile": args.cold_compile}
    print(f"{len(runs)} runs: {', '.join(r.label for r in runs)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_compile_cache_") as cache_dir, \
            open(os.path.join(args.out, "bench_train.log"), "w") as log, \
            concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        pending = []
        for index, run in enumerate(runs):
            # Time kept for the baseline runs still to come, so that the second baseline always runs.
            reserve = sum(r.expected_s(args.tiny) for r in runs[index + 1 :] if VARIANTS[r.variant].is_baseline)
            left = args.time_budget - (time.perf_counter() - started) - reserve
            if args.jobs == 1 and left < run.expected_s(args.tiny) and not VARIANTS[run.variant].is_baseline:
                run.error = f"skipped: would end past the {args.time_budget:.0f} s budget"
                print(f"[{time.perf_counter() - started:5.0f} s] {run.label}: {run.error}", flush=True)
                continue
            run.timeout = min(args.run_timeout, max(60.0, left)) if args.jobs == 1 else args.run_timeout
            pending.append(pool.submit(execute, run, args, cache_dir, log))
            if args.jobs == 1:
                pending[-1].result()
                print(f"[{time.perf_counter() - started:5.0f} s] {one_line(run)}", flush=True)
        for future in pending:
            future.result()
    report = {"env": env, "summary": summarise(runs),
              "runs": [{"label": r.label, "workload": r.workload, "repeat": r.repeat, "wall_s": round(r.wall_s, 1),
                        "error": r.error, "result": r.result} for r in runs]}
    report["env"]["device"] = next((r.result["device"] for r in runs if r.result), None)
    report["env"]["torch"] = next((r.result["torch"] for r in runs if r.result), None)
    report["env"]["total_s"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown_report(report)
    with open(os.path.join(args.out, "bench_train.md"), "w") as f:
        f.write(text)
    print(text)
    return report


def one_line(run: Run) -> str:
    if run.error:
        return f"{run.label}: {run.error}"
    r = run.result
    return (f"{run.label}: {r['step_ms']['median']:.1f} ms median ({r['step_ms']['p10']:.1f}-{r['step_ms']['p90']:.1f}), "
            f"{r['real_tokens_per_s']:.0f} real tok/s, MFU {100 * r['mfu']:.1f} %, steady after {r['warmup_steps']} "
            f"steps / {r['time_to_steady_s']:.0f} s, compiles in window {r['compiles_in_window']}, "
            f"wall {run.wall_s:.0f} s")


if __name__ == "__main__":
    main()
