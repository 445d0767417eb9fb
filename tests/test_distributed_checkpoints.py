"""Checkpoints with 2 CPU processes (torchrun, gloo): a step folder appears only once every rank's part is written,
even when one rank is slow; a rank killed mid-save leaves the previous checkpoint to resume from, bit for bit; a full
disk on one rank fails the save on every rank without a hang; per-node copies resume from a step every node has."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_lib.checkpoints import PARTIAL_PREFIX, checkpoint_problem, complete_checkpoints

WORKER = Path(__file__).with_name("distributed_checkpoint_worker.py")
SLOW_SECONDS = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, node_rank=None, port=None):
    nodes = [] if node_rank is None else ["--nnodes", "2", "--node_rank", str(node_rank), "--master_addr", "127.0.0.1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *nodes,
               "--master_port", str(port or free_port()), str(WORKER), *map(str, args)]
    path = os.pathsep.join([str(ROOT), str(ROOT / "examples"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # Its own session, so that a failing test can stop torchrun and its workers together.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@contextlib.contextmanager
def stopped_on_failure(*jobs):
    try:
        yield
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


def reports(output_dir, phase):
    return [json.loads((Path(output_dir) / f"report-{phase}-rank{rank}.json").read_text()) for rank in (0, 1)]


def watch(job, root: Path, until, deadline_s=240) -> dict:
    """Poll `root` until `until()` (or the job's end): how each `step-N` folder looked the moment it appeared."""
    first_sight, deadline = {}, time.time() + deadline_s
    while not until():
        assert time.time() < deadline, f"timed out; first sight of the step folders: {first_sight}"
        for name in os.listdir(root) if root.exists() else []:
            if name.startswith("step-") and name not in first_sight:
                folder = root / name
                first_sight[name] = {"problem": checkpoint_problem(str(folder)), "files": sorted(os.listdir(folder))}
        if job.poll() is not None:
            break
        time.sleep(0.005)
    return first_sight


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Steps 1-3 with rank 1 slow to write; at step 3 rank 1 hangs mid-save and is SIGKILLed. While it runs, every
    `step-N` folder is checked the moment it appears."""
    output_dir = tmp_path_factory.mktemp("killed-run")
    root, pid_file = output_dir / "checkpoints", output_dir / "hanging.pid"
    job = torchrun("--output_dir", output_dir, "--phase", "save", "--slow_seconds", SLOW_SECONDS, "--hang_at_step", 3)
    with stopped_on_failure(job):
        first_sight = watch(job, root, lambda: pid_file.exists() and (root / f"{PARTIAL_PREFIX}step-3").exists())
        assert job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.2)  # let rank 0 finish its part and wait at the barrier
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    return output_dir, first_sight, job.returncode, output


@pytest.fixture(scope="module")
def resumed_run(killed_run):
    output_dir = killed_run[0]
    job = torchrun("--output_dir", output_dir, "--phase", "resume")
    with stopped_on_failure(job):
        output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    return output_dir


def test_a_step_folder_appears_only_once_every_rank_has_written(killed_run):
    _, first_sight, _, output = killed_run
    assert set(first_sight) == {"step-1", "step-2"}, output[-3000:]
    for name, seen in first_sight.items():
        assert seen["problem"] is None, (name, seen)
        assert {"random_states_0.pkl", "random_states_1.pkl", "manifest.json"} <= set(seen["files"]), (name, seen)


def test_a_rank_killed_mid_save_leaves_only_complete_checkpoints(killed_run):
    output_dir, _, returncode, output = killed_run
    assert returncode != 0
    root = output_dir / "checkpoints"
    assert sorted(os.listdir(root)) == [f"{PARTIAL_PREFIX}step-3", "step-1", "step-2"], output[-3000:]
    assert complete_checkpoints(str(output_dir)) == [str(root / "step-1"), str(root / "step-2")]


def test_the_next_launch_resumes_from_the_last_complete_checkpoint_bit_for_bit(resumed_run):
    for before, after in zip(reports(resumed_run, "save"), reports(resumed_run, "resume"), strict=True):
        assert after["resumed_from"].endswith("step-2") and after["resumed_step"] == 2
        assert after["resumed"] == before["saved"]["2"]  # weights, Adam state and this rank's RNG


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_keeps_the_last_checkpoint(resumed_run):
    for report in reports(resumed_run, "resume"):
        assert "disk full while saving checkpoint" in report["disk_full_error"], report
        assert "rank 1: OSError" in report["disk_full_error"] and "step-3) is intact" in report["disk_full_error"]
        assert report["checkpoints_after"] == ["step-2", "step-3"]  # partial removed, nothing pruned


def test_per_node_copies_resume_from_the_newest_step_complete_on_every_node(tmp_path):
    port = free_port()
    nodes = [torchrun("--output_dir", tmp_path, "--phase", "per_node", nproc=1, node_rank=n, port=port)
             for n in (0, 1)]
    with stopped_on_failure(*nodes):
        for node in nodes:
            output, _ = node.communicate(timeout=240)
            assert node.returncode == 0, output[-3000:]
    node_reports = reports(tmp_path, "per_node")
    for rank, report in enumerate(node_reports):
        # Each node's disk has the model and optimizer (save_on_each_node) and only its own process's RNG state.
        assert {"model.safetensors", "optimizer.bin", f"random_states_{rank}.pkl"} <= set(report["own_files"])
        assert f"random_states_{1 - rank}.pkl" not in report["own_files"]
        assert report["resumed_from"] == str(tmp_path / f"node{rank}" / "checkpoints" / "step-1")
        assert report["resumed"] == report["saved"]["1"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend", ["fsdp-sharded", "fsdp-full", "deepspeed-zero2", "deepspeed-zero3"])
def test_on_two_gpus_every_state_layout_saves_atomically_resumes_and_exports(tmp_path, backend):
    """FSDP2 (sharded DCP folders, or full state) and DeepSpeed ZeRO-2 and 3 on 2 GPUs, a tiny Llama3Siglip2: step
    folders complete at first sight with a slow rank, bit-exact resume, disk full on one rank, export equal to the
    weights."""
    if backend.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    common = ("--output_dir", tmp_path, "--backend", backend, "--vlm")
    job = torchrun(*common, "--phase", "save", "--slow_seconds", SLOW_SECONDS)
    with stopped_on_failure(job):
        first_sight = watch(job, tmp_path / "checkpoints", lambda: job.poll() is not None, deadline_s=400)
        output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output[-3000:]
    assert set(first_sight) >= {"step-2", "step-3"} and all(s["problem"] is None for s in first_sight.values())
    job = torchrun(*common, "--phase", "resume")
    with stopped_on_failure(job):
        output, _ = job.communicate(timeout=400)
    assert job.returncode == 0, output[-3000:]
    for before, after in zip(reports(tmp_path, "save"), reports(tmp_path, "resume"), strict=True):
        assert after["resumed_step"] == 3 and after["resumed"] == before["saved"]["3"]
        assert "disk full while saving checkpoint" in after["disk_full_error"]
        assert after["checkpoints_after"] == ["step-2", "step-3"]
    export = reports(tmp_path, "resume")[0]["export"]
    assert export["exported_keys"] > 0 and export["mismatched"] == []
