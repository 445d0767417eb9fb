"""The markdown tables of a `bench_train.py` report: steady-state figures, compile and graph counts, the profile."""

from __future__ import annotations


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def steady_table(report: dict) -> list[str]:
    lines = [("| run | steady after | compile s (in window) | graphs | step ms: median [p10-p90] (min-max) | "
              "real tok/s | × faster baseline | MFU | MFU 6N | peak GiB | patch pad |"),
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        r = run["result"]
        if r is None:
            lines.append(f"| {run['label']} | {run['error']} |||||||||")
            continue
        flag = "" if r["valid"] else " **!**"
        ms = r["step_ms"]
        graphs = f"{r['graphs_after_warmup']['unique_graphs']} → {r['graphs_after_window']['unique_graphs']}"
        speedup = r["speedup_vs_faster_baseline"]
        lines.append(
            f"| {run['label']}{flag}{' *' if r['note'] else ''} | {r['warmup_steps']} steps / {r['time_to_steady_s']:.0f} s"
            f"{'' if r['steady'] else ' (not steady)'} | {r['compile']['compile_s']:.0f} ({r['compiles_in_window']}) | "
            f"{graphs} | {ms['median']:.1f} [{ms['p10']:.1f}-{ms['p90']:.1f}] ({ms['min']:.1f}-{ms['max']:.1f}) | "
            f"{r['real_tokens_per_s']:,.0f} | {'-' if speedup is None else f'{speedup:.2f}'} | {_pct(r['mfu_common'])} | "
            f"{_pct(r['mfu_6n'])} | {r['peak_gib']:.1f} | {_pct(r['patch_padding_fraction'])} |")
    notes = sorted({run["result"]["note"] for run in report["runs"] if run["result"] and run["result"]["note"]})
    lines += [""] + [f"\\* {note}" for note in notes]
    return lines


def graph_table(report: dict) -> list[str]:
    lines = [("| run | workload | steps seen | distinct (N, L) | graphs after warm-up → window | compiles | recompiles "
              "| guards that failed |"), "|---|---|---:|---:|---|---:|---:|---|"]
    for run in report["runs"]:
        r = run["result"]
        if r is None or not r["variant"]["compiled"]:
            continue
        reason = "; ".join(recompile_guards(r["compile"]["recompile_reasons"]))[:300] or "-"
        lines.append(f"| {run['label']} | {run['workload']} | {r['steps_seen']} | {r['distinct_image_shapes']} | "
                     f"{r['graphs_after_warmup']['unique_graphs']} → {r['graphs_after_window']['unique_graphs']} | "
                     f"{r['compile']['compiles']} | {r['compile']['recompiles']} | {reason.replace('|', '/')} |")
    return lines


def recompile_guards(reasons: list[dict]) -> list[str]:
    """The distinct failed guards, with the step; the decoder/encoder frame sharing (`len(args)`) is expected."""
    guards = {}
    for reason in reasons:
        for line in reason["reason"].splitlines():
            line = line.strip(" -")
            if line[:1].isdigit() and ":" in line:  # "0/0: tensor 'x' size mismatch ..."
                guard = line.split(":", 1)[1].split("#")[0].strip()
                guards.setdefault(guard, reason["step"])
    return [f"step {step}: {guard}" for guard, step in guards.items()]


def profile_lines(report: dict) -> list[str]:
    lines = []
    for run in report["runs"]:
        r = run["result"]
        if not r or not r.get("profile"):
            continue
        phases, kernels = r["profile"]["phases"], r["profile"]["kernels"]
        step = phases["step_ms"] or 1.0
        lines += [f"### Where the step goes: {run['label']}", "",
                  f"Phases (device clock, median of {phases['steps']} steps, step {step:.1f} ms):", "",
                  "| phase | ms | share |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.1f} | {100 * ms / step:.0f} % |" for name, ms in phases["phase_ms"].items()]
        window = kernels["window_ms_per_step"] or 1.0
        lines += ["", (f"Kernels by kind (torch.profiler, {kernels['steps']} steps, {window:.1f} ms a step on the device "
                       "clock; kernels on overlapping streams can add up past the busy time):"), "",
                  "| kind | ms / step | share of step |", "|---|---:|---:|"]
        lines += [f"| {kind} | {ms:.1f} | {100 * ms / window:.0f} % |" for kind, ms in kernels["kernel_ms_per_step"].items()]
        if kernels["device_idle_ms_per_step"] is not None:
            lines.append(f"| device idle (no kernel running) | {kernels['device_idle_ms_per_step']:.1f} | "
                         f"{100 * kernels['device_idle_ms_per_step'] / window:.0f} % |")
        syncs = ", ".join(f"{name} {v['calls']}× ({v['host_ms']:.1f} ms)"
                          for name, v in kernels["host_syncs_per_step"].items())
        lines += ["", f"Host syncs per step: {syncs or 'none seen'}.", "", "Top kernels (ms / step):", ""]
        lines += [f"- {ms:.2f} `{name}`" for name, ms in kernels["top_kernels_ms_per_step"].items()]
        lines.append("")
    return lines


def markdown_report(report: dict) -> str:
    env, summary = report["env"], report["summary"]
    ceiling = summary["ceiling_flops"]
    lines = [f"# Training benchmark, {env['date']}", "",
             f"`{env['command']}`", "",
             f"{env['device']}, torch {env['torch']}; {env['total_s']:.0f} s in all. One process per run; each warmed up "
             f"until no compile for {env['quiet']} steps and the median step time settled (±{100 * env['tolerance']:.0f} "
             f"%), then {env['steps']} timed steps on unseen batches. MFU against the median measured bf16 matmul "
             f"ceiling, {ceiling / 1e12:.4g} TFLOP/s"
             + (f" (runs measured {summary['ceiling_range'][0] / 1e12:.4g}-{summary['ceiling_range'][1] / 1e12:.4g})"
                if summary["ceiling_range"] else "") + ". **!** marks a run that compiled inside its timed window "
             "or never settled.", ""]
    lines += steady_table(report)
    for name, b in summary["baselines"].items():
        lines.append(f"Baseline runs ({name}): {', '.join(f'{v:,}' for v in b['runs_real_tokens_per_s'])} real tok/s, "
                     f"spread {100 * b['spread']:.1f} %; speed-ups are against the faster.")
    lines += ["", "## Compiled graphs", ""] + graph_table(report) + [""]
    lines += profile_lines(report)
    return "\n".join(lines) + "\n"
