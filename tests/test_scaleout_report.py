"""benchmarks/scaleout_report.py's speed table: each run against FSDP2 on one GPU with the same job label."""

import json

import pytest

from benchmarks.scaleout_report import speed, speed_run_name


def write_run(runs, name, tokens_per_second):
    (runs / name).mkdir(parents=True)
    (runs / name / "report.json").write_text(json.dumps({"tokens_per_second_steady": tokens_per_second}))


def test_labelled_jobs_compare_with_their_own_one_gpu_run(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "speed_fsdp2_x1", 1000.0)
    write_run(runs, "speed_fsdp2_x4", 3600.0)            # 900 a GPU
    write_run(runs, "speed_ddp_x4", 3200.0)              # 800 a GPU
    write_run(runs, "speed_fsdp2_x1_rows4", 1200.0)
    write_run(runs, "speed_fsdp2_x4_rows4", 4560.0)      # 1140 a GPU
    rows = {row["run"]: row for row in speed(runs, tmp_path / "logs")}
    assert rows["speed_fsdp2_x4"]["scaling_efficiency"] == pytest.approx(0.9)
    assert rows["speed_ddp_x4"]["vs_fsdp2_x4"] == pytest.approx(800 / 900)
    assert rows["speed_fsdp2_x4_rows4"]["tokens_per_s_per_gpu"] == pytest.approx(1140)
    assert rows["speed_fsdp2_x4_rows4"]["scaling_efficiency"] == pytest.approx(0.95)
    assert rows["speed_fsdp2_x1_rows4"]["exit"] == "no log"


def test_run_names():
    assert speed_run_name("speed_deepspeed_zero3_x4") == ("deepspeed_zero3", 4, None)
    assert speed_run_name("speed_fsdp2_x4_rows4") == ("fsdp2", 4, "rows4")
    with pytest.raises(ValueError, match="speed_<backend>_x<gpus>"):
        speed_run_name("speed_fsdp2")
