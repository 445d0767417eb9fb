"""Verdicts for `benchmarks/gpu_scaleout.sh`: read each run's report.json, steps.jsonl and log, write PHASE.json/.md.

    python benchmarks/scaleout_report.py correctness|resume|speed RUNS_DIR OUT_DIR

correctness  each backend × world size: finished (no hang, exit 0), 30 steps, the loss fell, final/ reloads within
             bf16 tolerance, and how often a rank had no image while another had several (from the logged ids and
             the parquet's image counts).
resume       same world size: the resumed steps have the uninterrupted run's sample digests and its losses (bf16
             noise); another world size: no sample id twice over the whole run; ZeRO: the refusal names the tool;
             two nodes: one report.json, one final/, one line per step.
speed        steady-state tokens/s per GPU, scaling efficiency against 1 GPU, MFU, straggler ratio, compile time.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

RELOAD_TOLERANCE = 0.125  # two bf16 steps at logit magnitudes of a few units


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(run: Path) -> list[dict]:
    path = run / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def exit_line(logs: Path, name: str) -> str:
    log = logs / f"{name}.log"
    if not log.exists():
        return "no log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("EXIT", "TIMEOUT"))]
    return " / ".join(lines) or "no exit line"


def error_lines(logs: Path, name: str, limit: int = 3) -> list[str]:
    log = logs / f"{name}.log"
    if not log.exists():
        return []
    text = log.read_text(errors="replace").splitlines()
    return [line[:300] for line in text if "Error" in line or "error:" in line][-limit:]


def image_counts(parquet: str = "/tmp/mixed.parquet") -> list[int] | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    if not Path(parquet).exists():
        return None
    images = pq.read_table(parquet, columns=["images"]).column("images").to_pylist()
    return [sum(image is not None for image in row) for row in images]


def step_ids(step: dict) -> list[list[int]]:
    """Per rank, the sample ids of the step (log_sample_ids), whatever the exact key layout."""
    ids = step.get("sample_ids") or step.get("ids_by_rank") or []
    if ids and isinstance(ids[0], int):
        return [ids]
    return ids


def loss_fell(losses: list[float]) -> bool | None:
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) < 10:
        return None
    return statistics.mean(finite[-5:]) < statistics.mean(finite[:5])


def correctness(runs: Path, logs: Path) -> list[dict]:
    counts = image_counts()
    rows = []
    for run in sorted(p for p in runs.iterdir()
                      if p.is_dir() and p.name.endswith(("_x2", "_x3", "_x4")) and "_to_" not in p.name):
        report = read_json(run / "report.json") or {}
        steps = read_steps(run)
        row = {
            "run": run.name,
            "exit": exit_line(logs, run.name),
            "steps": report.get("steps"),
            "loss_first": report.get("train_loss_first"),
            "loss_last": report.get("train_loss_last"),
            "loss_fell": loss_fell(report.get("loss_curve", [])),
            "final_reload_max_abs_diff": report.get("final_reload_max_abs_diff"),
            "errors": error_lines(logs, run.name) if not report else [],
        }
        diff = row["final_reload_max_abs_diff"]
        row["reload_ok"] = diff is not None and diff <= RELOAD_TOLERANCE
        if counts is not None and steps and step_ids(steps[0]):
            mixed = uneven = 0
            for step in steps:
                per_rank = [sum(counts[i] for i in ids) for ids in step_ids(step)]
                mixed += min(per_rank) == 0 and max(per_rank) >= 2
                uneven += len(set(per_rank)) > 1
            row["steps_with_a_text_only_rank_beside_2plus_images"] = mixed
            row["steps_with_unequal_image_counts"] = uneven
        row["ok"] = bool(report) and row["steps"] == 30 and row["loss_fell"] and row["reload_ok"]
        rows.append(row)
    return rows


def resume(runs: Path, logs: Path) -> list[dict]:
    rows = []
    for killed in sorted(runs.glob("*_killed")):
        reference = runs / killed.name.removesuffix("_killed")  # fsdp2_x4_killed: the uninterrupted fsdp2_x4
        ref_steps, new_steps = read_steps(reference), read_steps(killed)
        by_step = {s["step"]: s for s in ref_steps}
        resumed = [s for s in new_steps if s["step"] > 20]
        same_digest = all(by_step.get(s["step"], {}).get("digest") == s.get("digest") for s in resumed)
        loss_gap = max((abs(by_step[s["step"]]["loss"] - s["loss"]) for s in resumed if s["step"] in by_step),
                       default=None)
        rows.append({"run": killed.name, "kind": "same world size, SIGKILL after step-20",
                     "exit": exit_line(logs, killed.name), "resumed_steps": len(resumed),
                     "digests_equal": same_digest and len(resumed) == 10, "max_loss_gap": loss_gap,
                     "ok": same_digest and len(resumed) == 10 and loss_gap is not None and loss_gap < 0.05})
    for run in sorted(runs.glob("*_to_*")):
        steps = read_steps(run)
        ids = [i for s in steps for rank in step_ids(s) for i in rank]
        report = read_json(run / "report.json") or {}
        log = (logs / f"{run.name}.log").read_text(errors="replace") if (logs / f"{run.name}.log").exists() else ""
        row = {"run": run.name, "kind": "another world size", "exit": exit_line(logs, run.name),
               "steps": report.get("steps"), "ids": len(ids), "duplicate_ids": len(ids) - len(set(ids)),
               "loss_fell": loss_fell(report.get("loss_curve", []))}
        if "zero3" in run.name:
            row["refusal_names_tool"] = "ds_to_universal" in log
            row["ok"] = row["refusal_names_tool"] and not report
        else:
            row["ok"] = report.get("steps") == 30 and row["duplicate_ids"] == 0 and len(ids) > 0
        rows.append(row)
    two = runs / "two_nodes"
    if two.exists():
        steps = read_steps(two)
        row = {"run": "two_nodes", "kind": "2 nodes x 1 GPU, checkpoint, resume",
               "steps_lines": len(steps), "distinct_steps": len({s["step"] for s in steps}),
               "report": (two / "report.json").exists(), "final": (two / "final").exists(),
               "checkpoints": sorted(p.name for p in (two / "checkpoints").iterdir()) if (two / "checkpoints").exists() else [],
               "node_logs": {n: exit_line(logs, n) for n in ("two_nodes_first_node0", "two_nodes_first_node1",
                                                              "two_nodes_resumed_node0", "two_nodes_resumed_node1")}}
        row["ok"] = row["steps_lines"] == 30 == row["distinct_steps"] and row["report"] and row["final"]
        rows.append(row)
    return rows


def speed(runs: Path, logs: Path) -> list[dict]:
    rows = []
    for run in sorted(runs.glob("speed_*")):
        report = read_json(run / "report.json") or {}
        gpus = speed_run_name(run.name)[1]
        steady = report.get("tokens_per_second_steady") or report.get("steady_tokens_per_second")
        rows.append({"run": run.name, "gpus": gpus, "exit": exit_line(logs, run.name),
                     "tokens_per_s_per_gpu": steady / gpus if steady else None,
                     **{k: report.get(k) for k in ("mfu_steady", "step_seconds_median", "step_seconds_p10",
                                                   "step_seconds_p90", "compile_seconds", "graph_count",
                                                   "straggler_ratio_work", "straggler_ratio_compute",
                                                   "peak_memory_gib", "host_syncs_per_step")},
                     "errors": error_lines(logs, run.name) if not report else []})
    by_name = {r["run"]: r for r in rows if r["tokens_per_s_per_gpu"]}
    for row in rows:
        if not row["tokens_per_s_per_gpu"] or "8b" in row["run"]:
            continue
        _, gpus, label = speed_run_name(row["run"])
        suffix = f"_{label}" if label else ""  # a labelled job (other arguments) compares with its own label's runs
        one, fsdp2_x4 = by_name.get(f"speed_fsdp2_x1{suffix}"), by_name.get(f"speed_fsdp2_x4{suffix}")
        if one:  # per-GPU tokens/s against FSDP2 on one GPU (for ZeRO-3 and DDP: against the same)
            row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
        if fsdp2_x4 and gpus == 4:
            row["vs_fsdp2_x4"] = row["tokens_per_s_per_gpu"] / fsdp2_x4["tokens_per_s_per_gpu"]
    return rows


def speed_run_name(name: str) -> tuple[str, int, str | None]:
    """`speed_<backend>_x<gpus>[_<label>]` -> (backend, gpus, label); gpu_scaleout.sh's SPEED_JOBS names them."""
    match = re.fullmatch(r"speed_(.+?)_x(\d+)(?:_(\w+))?", name)
    if match is None:
        raise ValueError(f"{name}: not a speed run's folder name (speed_<backend>_x<gpus>[_<label>])")
    return match[1], int(match[2]), match[3]


def markdown(phase: str, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "errors"))
    lines = [f"## {phase}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        for error in row.get("errors", []):
            lines.append(f"- {row['run']}: `{error}`")
    return "\n".join(lines) + "\n"


def main(phase: str, runs_dir: str, out_dir: str) -> None:
    runs, out = Path(runs_dir), Path(out_dir)
    logs = runs / "logs"
    rows = {"correctness": correctness, "resume": resume, "speed": speed}[phase](runs, logs)
    (out / f"{phase}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{phase}.md").write_text(markdown(phase, rows))
    print(markdown(phase, rows))


if __name__ == "__main__":
    main(*sys.argv[1:4])
