"""The training benchmark's driver, workers and measurement rules, with tiny dimensions on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.compile_watch import CompileWatch, SteadyState
from benchmarks.step_profile import _union_us, kernel_kind


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "benchmarks/bench_train.py", "--tiny", "--variants", "baseline,packed,all",
               "--jobs", "2", "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads((out / "bench_train.json").read_text()), out


def test_each_run_is_its_own_process_and_the_baseline_runs_twice(tiny_report):
    report, _ = tiny_report
    runs = {run["label"]: run for run in report["runs"]}
    assert list(runs) == ["baseline #1", "packed", "all", "baseline #2"]
    for label, run in runs.items():
        assert run["error"] is None, f"{label}: {run['error']}"
    pids = {run["result"]["pid"] for run in runs.values()}
    assert len(pids) == 4 and os.getpid() not in pids


def test_runs_are_timed_only_once_steady_with_no_compile_in_the_window(tiny_report):
    report, _ = tiny_report
    for run in report["runs"]:
        r = run["result"]
        assert r["steady"] and r["valid"] and r["compiles_in_window"] == 0, run["label"]
        assert r["warmup_steps"] >= 2 and r["steps"] == 3 and len(r["step_s"]) == 3
        ms = r["step_ms"]
        assert 0 < ms["min"] <= ms["p10"] <= ms["median"] <= ms["p90"] <= ms["max"]
        assert r["real_tokens_per_s"] > 0 and r["mfu_common"] > 0 and r["model_tflop_per_step"] > 0


def test_compiled_run_keeps_its_graphs_while_image_shapes_change(tiny_report):
    report, _ = tiny_report
    runs = {run["label"]: run["result"] for run in report["runs"]}
    compiled, eager = runs["all"], runs["baseline #1"]
    assert eager["graphs_after_window"]["unique_graphs"] == 0
    assert compiled["compile"]["compiles"] >= 1 and compiled["time_to_steady_s"] > 0
    assert compiled["distinct_image_shapes"] >= 3  # every step brings a new (N, L)...
    assert 1 <= compiled["graphs_after_window"]["unique_graphs"] == compiled["graphs_after_warmup"]["unique_graphs"]


def test_speedups_are_against_the_faster_baseline_and_packed_runs_start_from_the_same_loss(tiny_report):
    report, out = tiny_report
    runs = {run["label"]: run["result"] for run in report["runs"]}
    assert max(runs["baseline #1"]["speedup_vs_faster_baseline"], runs["baseline #2"]["speedup_vs_faster_baseline"]) == 1
    assert abs(runs["packed"]["losses"][0] - runs["all"]["losses"][0]) < 1e-3
    assert runs["baseline #1"]["losses"][:2] == runs["baseline #2"]["losses"][:2]  # same weights, same batches
    markdown = (out / "bench_train.md").read_text()
    assert "Where the step goes: all" in markdown and "| vision_fwd |" in markdown
    assert runs["all"]["profile"]["phases"]["steps"] == 2


def test_compile_watch_records_a_recompile_in_the_step_it_happened():
    torch._dynamo.reset()
    watch = CompileWatch().install()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    for step, size in enumerate([4, 4, 4, 6, 6]):
        watch.step = step
        double(torch.ones(size))
    dynamo = [e for e in watch.events if e.trigger == "DYNAMO"]
    assert [e.step for e in dynamo] == [0, 3]
    assert watch.summary()["recompiles"] == 1 and len(watch.events_in(3, 4)) == 1
    assert "size mismatch" in watch.recompile_reasons[0]["reason"]


def test_steady_state_needs_quiet_steps_and_a_settled_time():
    rule = SteadyState(min_steps=4, quiet=2, tolerance=0.1)
    assert not rule.reached([9.0, 1.0, 1.0], last_compile_step=0)  # too few steps
    assert not rule.reached([9.0, 1.0, 1.0, 1.0], last_compile_step=2)  # compiled one step ago
    assert not rule.reached([9.0, 5.0, 1.0, 1.0], last_compile_step=0)  # still getting faster
    assert rule.reached([9.0, 1.0, 1.0, 1.05, 1.0], last_compile_step=0)


def test_profile_kernel_kinds_and_busy_time():
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_kind("triton_tem_fused_flex_attention_0") == "attention"
    assert kernel_kind("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert kernel_kind("triton_poi_fused_add_mul_0") == "triton (compiled)"
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)") == "memcpy/memset"
    assert _union_us([(0, 10), (5, 15), (20, 30)]) == 25


def test_bucketed_patch_length_gives_the_same_image_features():
    """all+bucket pads L with masked patches: the model's output must not change."""
    from benchmarks.bench_model import TEXT_TINY, VISION_TINY, build_model, model_config
    from benchmarks.train_workload import WORKLOADS, bucket_patch_length, make_samples, padded_batch

    config = model_config(TEXT_TINY, VISION_TINY, merge=2)
    model = build_model(config, torch.device("cpu")).eval()
    samples = make_samples(6, WORKLOADS["varied"][1], config, seed=3)
    batch = padded_batch(samples, pad_id=0, merge=2)
    bucketed = bucket_patch_length(batch, 64)
    L, L_bucket = batch.tensors["pixel_values"].shape[1], bucketed.tensors["pixel_values"].shape[1]
    assert L_bucket % 64 == 0 and L_bucket > L
    assert bucketed.padded_patches == len(samples) * L_bucket

    def logits(tensors):
        with torch.no_grad():
            return model(**tensors).logits
    torch.testing.assert_close(logits(bucketed.tensors), logits(batch.tensors), rtol=1e-5, atol=1e-5)
