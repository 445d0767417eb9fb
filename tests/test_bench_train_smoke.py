"""The training benchmark runs end to end with tiny dimensions on the CPU, through the code path the GPU run takes."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_runs_and_its_packed_variants_start_from_the_same_loss(tmp_path):
    """Same weights and same first packed batch: chunked loss, grouped positions, compiled and checkpointed layers
    must all give the loss the plain packed path gives (to bf16 rounding)."""
    out = tmp_path / "bench_train.json"
    variants = "baseline,packed,packed+loss+pos,all+ckpt"
    command = [sys.executable, "benchmarks/bench_train.py", "--tiny", "--steps", "1", "--skip-checks",
               "--variants", variants, "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.rstrip().splitlines()[-1].startswith("*"), "the table (and its notes) print last"

    results = json.loads(out.read_text())["results"]
    assert [r["variant"]["name"] for r in results] == variants.split(",")
    for r in results:
        assert r["error"] is None, f"{r['variant']['name']}: {r['error']}"
        assert r["real_tokens_per_s"] > 0 and 0 < r["mfu"] and r["model_tflop_per_step"] > 0
    first_losses = [r["losses"][0] for r in results if r["variant"]["packed"]]
    assert max(first_losses) - min(first_losses) < 1e-3, first_losses
