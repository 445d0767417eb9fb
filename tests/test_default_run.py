"""The README's main job, exactly as a newcomer types it: `accelerate launch examples/train.py`.

It must learn to caption the held-out scenes (≥ 95 % exact match) and only from the pixels (≤ 10 % with blank
images), then reload `final/` with the Auto classes. Its wall time is printed, not asserted: speed goals live in
benchmarks, and the README records the figure measured on the CI machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_run_learns_to_caption_from_the_image(tmp_path):
    launcher = shutil.which("accelerate")
    command = [launcher, "launch"] if launcher else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'examples'}"}
    start = time.time()
    result = subprocess.run([*command, str(ROOT / "examples" / "train.py"), "--output_dir", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
    wall = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"default run: exact match {report['eval_exact_match']:.3f}, blank images "
          f"{report['eval_exact_match_blank_images']:.3f}, wall {wall:.0f} s (training {report['wall_seconds']:.0f} s)")
    assert report["eval_exact_match"] >= 0.95
    assert report["eval_exact_match_blank_images"] <= 0.10
    assert "reloaded" in result.stdout and (tmp_path / "final" / "model.safetensors").exists()
