"""examples/train.py over several CPU processes (gloo): exact resume after SIGKILL with a rank that saves slowly,
resume on another number of processes, two "nodes" on one host, and SIGTERM to the whole process group.

Every run is a real job: `torch.distributed.run` (torchrun) or plain python, as the process tree a cluster starts.
`steps.jsonl` (one line per step with a digest of every rank's sample ids) is how the tests see which samples each
step trained on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import EXAMPLES, child_env, final_weights, train_command

sys.path.insert(0, str(EXAMPLES))

from train_lib.checkpoints import complete_checkpoints
from train_lib.metrics import read_steps

# No evaluation: these tests are about the steps, and each run stays a few seconds of training.
QUIET = ["--eval_samples", 0]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(processes: int, *torchrun_args) -> tuple:
    if processes == 1 and not torchrun_args:
        return (sys.executable,)
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *torchrun_args)


def start(*args, processes: int = 2, torchrun_args=None) -> subprocess.Popen:
    """A job in its own process group (as a scheduler starts one); its stdout and stderr go to files next to the
    output folder (`job.out`, `job.err`: pipes could fill and stall one "node" while the other waits for it)."""
    torchrun_args = torchrun_args or (("--master_port", str(free_port())) if processes > 1 else ())
    logs = Path(os.path.dirname(str(args[args.index("--output_dir") + 1])))
    name = f"{time.monotonic_ns()}"
    out, err = open(logs / f"{name}.out", "w+"), open(logs / f"{name}.err", "w+")  # noqa: SIM115 - closed by finish
    job = subprocess.Popen(train_command(*QUIET, *args, launcher=launcher(processes, *torchrun_args)),
                           env=child_env(), stdout=out, stderr=err, text=True, start_new_session=True)
    job.out, job.err = out, err
    return job


def output(job: subprocess.Popen) -> tuple[str, str]:
    job.out.seek(0), job.err.seek(0)
    return job.out.read(), job.err.read()


def finish(job: subprocess.Popen) -> tuple[str, str]:
    try:
        job.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid, signal.SIGKILL)
        job.wait()
    out, err = output(job)
    job.out.close(), job.err.close()
    assert job.returncode == 0, f"exit {job.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def run(*args, processes: int = 2) -> tuple[str, str]:
    return finish(start(*args, processes=processes))


def wait_for(done, job: subprocess.Popen, what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not done():
        assert job.poll() is None, f"the job ended before {what}:\n{output(job)[1][-3000:]}"
        assert time.time() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.05)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants. torchrun starts each rank in a session of its own, so killing torchrun's process
    group leaves the ranks running; a cluster's scheduler kills them all (a cgroup), and so do the tests."""
    tree = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the task ended meanwhile
            continue
        for child in children:
            tree += process_tree(int(child))
    return tree


def kill_tree(pid: int, sig: int) -> None:
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def digests(output_dir: Path) -> list[tuple[int, str]]:
    return [(record["step"], record["digest"]) for record in read_steps(output_dir)]


def test_two_processes_killed_after_a_checkpoint_resume_bit_identically_with_a_slow_saving_rank(tmp_path):
    """Rank 1 writes its part of each checkpoint 2 s after rank 0; SIGKILL to the job once step-3 is complete;
    the resumed job ends with the weights and per-step sample digests of a job never interrupted."""
    common = ["--max_steps", 6, "--checkpoint_every", 3, "--keep_checkpoints", 5]
    reference = tmp_path / "uninterrupted"
    run("--output_dir", reference, *common)

    resumed = tmp_path / "killed"
    slow = ["--test_slow_save_rank", 1, "--test_slow_save_seconds", 2]
    victim = start("--output_dir", resumed, *common, *slow)
    wait_for((resumed / "checkpoints" / "step-3").exists, victim, "checkpoint step-3")
    kill_tree(victim.pid, signal.SIGKILL)  # torchrun and both ranks at once, as a node failure would
    victim.wait()
    assert not (resumed / "final").exists(), "the job finished before it was killed; the test proves nothing"

    run("--output_dir", resumed, *common, *slow, "--resume_from_checkpoint", "latest")
    expected, actual = final_weights(reference), final_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert digests(resumed) == digests(reference)
    assert [r["step"] for r in read_steps(resumed)] == list(range(1, 7))
    assert_straggler_figures(reference)


def assert_straggler_figures(output_dir: Path) -> None:
    """A run of two processes reports how far its slowest rank is from the mean, for each step and steady."""
    report = json.loads((output_dir / "report.json").read_text())
    for key in ("straggler_ratio_work", "straggler_ratio_compute"):
        assert report[key] is not None and math.isfinite(report[key]) and report[key] >= 1.0, (key, report[key])
    records = read_steps(output_dir)
    assert all(record["straggler_work"] >= 1.0 for record in records)
    assert records[0]["straggler_compute"] is None  # no previous step to have timed
    assert all(record["straggler_compute"] >= 1.0 for record in records[1:])


def loader_sample_ids(args: list, phases: list[tuple[int, int]]) -> list[list[list[int]]]:
    """Each step's sample ids, rank by rank, straight from the data pipeline: `phases` of (world size, steps), each
    resumed from all ranks' states at the end of the one before, as the data API defines it."""
    from train_lib.arguments import data_config, parse_arguments
    from train_lib.model_factory import build_model_and_processor

    from processing.data import build_train_dataloader
    from tests.test_train import TINY

    model_args, data_args, train_args = parse_arguments([*TINY, *map(str, args)])
    _, processor = build_model_and_processor(model_args)
    config, steps_ids, states = data_config(data_args, train_args.seed), [], None
    for world_size, steps in phases:
        loaders = [build_train_dataloader(config, processor, data_args.seq_len, rank=rank, world_size=world_size)
                   for rank in range(world_size)]
        for loader in loaders:
            if states:
                loader.load_state_dicts(states)
        batches = [iter(loader) for loader in loaders]
        for _ in range(steps):
            step_ids = []
            for loader, rank_batches in zip(loaders, batches):
                next(rank_batches)
                step_ids.append(loader.last_sample_ids)
            steps_ids.append(step_ids)
        states = [loader.state_dict() for loader in loaders]
    return steps_ids


def test_resume_on_another_number_of_processes_trains_each_sample_once_and_keeps_learning(tmp_path):
    """2 processes, then 1, then 2 again: each step trains on exactly the samples the data pipeline deals after
    re-dealing every rank's saved position, no sample twice within the epoch, and the loss keeps falling."""
    output_dir = tmp_path / "run"
    data = ["--scenes_size", 400]  # an epoch longer than the run: any repeat would be a resume's fault
    common = ["--output_dir", output_dir, *data, "--log_sample_ids", "true", "--checkpoint_every", 2,
              "--learning_rate", 3e-3]
    run(*common, "--max_steps", 2, processes=2)
    run(*common, "--max_steps", 6, "--resume_from_checkpoint", "latest", processes=1)
    run(*common, "--max_steps", 16, "--resume_from_checkpoint", "latest", processes=2)

    records = read_steps(output_dir)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert [r["sample_ids"] for r in records] == loader_sample_ids(data, [(2, 2), (1, 4), (2, 10)])
    seen = [i for r in records for rank_ids in r["sample_ids"] for i in rank_ids]
    assert len(seen) == len(set(seen)) and all(r["ids"] == sum(map(len, r["sample_ids"])) for r in records)

    losses = [r["loss"] for r in records]
    assert losses[2] < losses[0] and losses[6] < losses[2]  # after each resume, below where the last job began
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2


def test_two_nodes_write_once_per_job_and_show_progress_once_per_node(tmp_path):
    """Two torchrun trees (--nnodes 2, one process each) on one host, trained to a checkpoint and then resumed:
    report.json, final/ and steps.jsonl are written once for the job, the summary printed once, and each node
    shows its own progress bar."""
    output_dir = tmp_path / "run"
    common = ["--output_dir", output_dir, "--checkpoint_every", 2, "--profile_steps", 1]
    for max_steps, resume in ((2, []), (4, ["--resume_from_checkpoint", "latest"])):
        port = str(free_port())
        nodes = [start(*common, "--max_steps", max_steps, *resume, processes=1,
                       torchrun_args=("--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                                      "--master_port", port)) for rank in range(2)]
        outputs = [finish(node) for node in nodes]
    (out0, err0), (out1, err1) = outputs
    assert out0.count("setup     ") == 1 and "setup     " not in out1  # the start-up summary: the job's main
    assert out0.count('"steps": 4') == 1 and '"steps": 4' not in out1  # the end summary, likewise
    assert "4/4" in err0 and "4/4" in err1  # one progress bar per node
    assert [r["step"] for r in read_steps(output_dir)] == [1, 2, 3, 4]
    assert json.loads((output_dir / "report.json").read_text())["steps"] == 4
    assert (output_dir / "final" / "model.safetensors").exists()
    assert [Path(p).name for p in complete_checkpoints(str(output_dir))] == ["step-2", "step-4"]
    # Per rank, not per node or job: each rank profiled its own last step.
    assert sorted(p.name for p in (output_dir / "profile").iterdir()) == [
        "rank0.trace.json.gz", "rank0.txt", "rank1.trace.json.gz", "rank1.txt"]
    assert all("the last 1 steps" in (output_dir / "profile" / f"rank{r}.txt").read_text() for r in (0, 1))


def a_step_logged(output_dir: Path) -> bool:
    """The run has logged a step, so every rank is in the loop with its SIGTERM handler installed. The progress
    bar's first line ("0/100000 [00:00<?, ?it/s]") comes before that: a SIGTERM then, under load, reached a rank still
    starting up, which died of it."""
    steps = output_dir / "steps.jsonl"
    return steps.exists() and steps.read_text().count("\n") >= 1


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_0_then_resumes(tmp_path):
    """`kill -TERM -PGID` reaches the training process and its 2 loader workers: the workers live on, the run
    saves a checkpoint after the current step and exits 0, and a resumed run finishes from there."""
    output_dir = tmp_path / "run"
    job = start("--output_dir", output_dir, "--max_steps", 100000, "--num_workers", 2, processes=1)
    wait_for(lambda: a_step_logged(output_dir), job, "a training step")
    os.killpg(job.pid, signal.SIGTERM)
    out, err = finish(job)
    assert "SIGTERM: saved step" in out
    checkpoints = complete_checkpoints(str(output_dir))
    assert len(checkpoints) == 1, err[-3000:]

    saved = int(Path(checkpoints[0]).name.removeprefix("step-"))
    run("--output_dir", output_dir, "--max_steps", saved + 2, "--num_workers", 2, "--resume_from_checkpoint",
        "latest", processes=1)
    assert json.loads((output_dir / "report.json").read_text())["steps"] == saved + 2
    assert [r["step"] for r in read_steps(output_dir)] == list(range(1, saved + 3))


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """torchrun passes the scheduler's SIGTERM on to each rank's process group (the rank and its 2 loader workers),
    not at the same instant; the ranks agree in the step's summary, save one checkpoint together and stop."""
    output_dir = tmp_path / "run"
    job = start("--output_dir", output_dir, "--max_steps", 100000, "--num_workers", 2, processes=2)
    wait_for(lambda: a_step_logged(output_dir), job, "a training step")
    os.killpg(job.pid, signal.SIGTERM)  # torchrun's group; the ranks are in sessions of their own
    job.wait(timeout=TIMEOUT)  # torchrun itself reports the signal (SignalException): its exit code is not ours
    out, err = output(job)
    assert out.count("SIGTERM: saved step") == 1, err[-3000:]
    assert not any(failure in err for failure in ("RuntimeError", "killed by signal", "exited unexpectedly")), err
    checkpoints = complete_checkpoints(str(output_dir))
    assert len(checkpoints) == 1
    saved = int(Path(checkpoints[0]).name.removeprefix("step-"))
    assert read_steps(output_dir)[-1]["step"] == saved


def test_deepspeed_checkpoint_on_another_world_size_names_the_universal_checkpoint_tool():
    from types import SimpleNamespace

    from train_lib.resume import check_reshardable

    accelerator = SimpleNamespace(num_processes=4, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ValueError, match=r"saved by DeepSpeed ZeRO-3 on 2 processes.*ds_to_universal"):
        check_reshardable(accelerator, "out/checkpoints/step-10", saved=2)
    check_reshardable(accelerator, "out/checkpoints/step-10", saved=4)  # same world size: fine


def test_loader_workers_leave_the_job_process_group_and_keep_serving_batches():
    """What the process-group tests rely on, without their timing: the workers run in process groups of their own,
    so a scheduler's `kill -TERM -PGID` cannot reach them, and they go on delivering batches."""
    from train_lib.arguments import data_config, parse_arguments
    from train_lib.model_factory import build_model_and_processor
    from train_lib.preemption import batches_through_sigterm

    from processing.data import build_train_dataloader
    from tests.test_train import TINY

    model_args, data_args, train_args = parse_arguments([*TINY, "--num_workers", "2"])
    _, processor = build_model_and_processor(model_args)
    loader = build_train_dataloader(data_config(data_args, train_args.seed), processor, data_args.seq_len)
    before = set(child_pids())
    batches = batches_through_sigterm(loader)
    next(batches)
    workers = set(child_pids()) - before
    assert len(workers) == 2
    assert all(os.getpgid(pid) == pid != os.getpgid(0) for pid in workers)
    for _ in range(12):  # more than the 2 workers x prefetch 2 already queued
        next(batches)
    batches.close()


COMPILE_POOL_AFTER_SIGTERM = """
import operator, os, signal, sys, time
from train_lib.preemption import StopRequested, compile_workers_through_sigterm
from torch._inductor.async_compile import AsyncCompile
stop = StopRequested()
if sys.argv[1] == "held back":
    compile_workers_through_sigterm()
pool = AsyncCompile.process_pool()  # the one the helper started, or a plain one
assert pool.submit(operator.add, 1, 2).result(timeout=60) == 3
os.killpg(0, signal.SIGTERM)  # the scheduler's SIGTERM to the job's group, while the pool lives
while not stop.requested:
    time.sleep(0.01)
time.sleep(1)  # the sidecar, had it received it, is dead by now
try:
    print("answered", pool.submit(operator.add, 2, 3).result(timeout=float(sys.argv[2])))
except Exception:  # TimeoutError where torch waits for the dead sidecar; an error where it notices
    print("no answer")
"""


@pytest.mark.parametrize("start", ["held back", "plain"])
def test_inductors_compile_workers_still_compile_after_a_sigterm_to_the_group(start):
    """A recompilation after the scheduler's SIGTERM (a new image shape) must not wait forever for compile workers
    the signal killed: the step would never end and the checkpoint never be written. Started plainly they die
    (the control: torch waits for them), started by `compile_workers_through_sigterm` they answer."""
    env = {**child_env(), "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    wait = 20 if start == "held back" else 3
    job = subprocess.run([sys.executable, "-c", COMPILE_POOL_AFTER_SIGTERM, start, str(wait)], env=env,
                         capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True, check=False)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.split() == (["answered", "5"] if start == "held back" else ["no", "answer"])


def test_a_run_with_loader_workers_that_fails_still_exits(tmp_path):
    """Workers that ignored SIGTERM would hang the process at exit after an error (multiprocessing's exit handler
    terminates daemonic children and waits): the data check failing here must end the job."""
    job = start("--output_dir", tmp_path / "run", "--max_steps", 1000, "--seq_len", 24, "--num_workers", 2,
                processes=1)
    try:
        job.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid, signal.SIGKILL)
        raise
    assert job.returncode == 1 and "DataQualityError" in output(job)[1]


def child_pids() -> list[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_the_step_summary_takes_fsdp2s_dtensor_gradient_norm():
    """FSDP2's clip returns the norm as a DTensor, which cannot be stacked with the plain loss tensor."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from train_lib.step_sync import start_step_summary

    store_port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        norm = DTensor.from_local(torch.tensor(2.5), mesh, [Replicate()])
        one_process = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=lambda tensor: tensor)
        summary = start_step_summary(one_process, torch.tensor(1.25), norm, tokens=10, samples=2, sample_ids=[4, 7],
                                     samples_seen=2, skipped=[0, 1], stop=False, work=5.0, compute_ms=math.nan).read()
    finally:
        dist.destroy_process_group()
    assert (summary.loss, summary.grad_norm, summary.finite, summary.skipped) == (1.25, 2.5, True, [0, 1])


def test_straggler_ratio_is_the_largest_rank_over_the_mean_leaving_out_the_unmeasured():
    from train_lib.step_sync import straggler_ratio

    assert straggler_ratio([1.0, 2.0, 3.0]) == 1.5
    assert straggler_ratio([4.0, 4.0]) == 1.0
    assert straggler_ratio([2.0, math.nan, 4.0]) == 4.0 / 3.0
    assert straggler_ratio([math.nan]) == straggler_ratio([7.0]) == 1.0  # one process is its own mean
    assert math.isnan(straggler_ratio([math.nan, math.nan]))
    assert math.isnan(straggler_ratio([0.0, 0.0]))


def test_the_step_summary_vector_carries_each_ranks_figures_to_their_own_fields():
    """Two ranks' rows through the summary's layout: sums, flags, skip counts, the digest and both straggler ratios
    come back from the fields each rank put them in."""
    import hashlib
    from types import SimpleNamespace

    from train_lib.step_sync import sample_ids_digest, start_step_summary

    figures = [
        {"tokens": 100, "samples": 3, "sample_ids": [1, 2, 3], "samples_seen": 30, "skipped": [1, 0, 2],
         "stop": False, "work": 1e15, "compute_ms": 40.0, "compiled": True},
        {"tokens": 300, "samples": 5, "sample_ids": [4, 5, 6, 7, 8], "samples_seen": 50, "skipped": [0, 4, 0],
         "stop": True, "work": 3e15, "compute_ms": 60.0, "compiled": False},
    ]
    rank1 = []
    recorder = SimpleNamespace(device=torch.device("cpu"), num_processes=1,
                               gather=lambda vector: rank1.append(vector.clone()) or vector)
    start_step_summary(recorder, torch.tensor(0.75), torch.tensor(2.0), **figures[1])  # records rank 1's row
    two_ranks = SimpleNamespace(device=torch.device("cpu"), num_processes=2,
                                gather=lambda vector: torch.cat([vector, rank1[0]]))
    summary = start_step_summary(two_ranks, torch.tensor(0.5), torch.tensor(2.0), **figures[0]).read()

    expected_digest = hashlib.sha1(sample_ids_digest([1, 2, 3]) + sample_ids_digest([4, 5, 6, 7, 8])).hexdigest()
    assert (summary.loss, summary.grad_norm, summary.finite, summary.stop) == (1.25, 2.0, True, True)
    assert summary.compiled  # rank 0 compiled: a warm-up step for every rank
    assert (summary.tokens, summary.samples, summary.sample_ids, summary.samples_seen) == (400, 8, 8, 80)
    assert (summary.skipped, summary.digest) == ([1, 4, 2], expected_digest)
    assert (summary.straggler_work, summary.straggler_compute) == (1.5, 1.2)
    for flags in ([False, False], [False, True]):
        for figure, flag in zip(figures, flags):
            figure["compiled"] = flag
        rank1.clear()
        start_step_summary(recorder, torch.tensor(0.75), torch.tensor(2.0), **figures[1])
        summary_of_flags = start_step_summary(two_ranks, torch.tensor(0.5), torch.tensor(2.0), **figures[0]).read()
        assert summary_of_flags.compiled == any(flags)
    record = summary.record(7)
    assert (record["straggler_work"], record["straggler_compute"]) == (1.5, 1.2)


def test_a_ranks_work_is_the_mfu_formula_with_its_packed_samples_attention():
    """Two ranks with the same tokens: the one whose row is one long sample has more attention work than the one
    whose row holds two short ones, by the formula's attention term; with whole-row spans it is the MFU's figure."""
    from train_lib.loop import attention_pairs, batch_counts
    from train_lib.reporting import FlopModel, flops_per_token
    from train_lib.step_sync import straggler_ratio

    from tests.test_train import TINY

    pad = 0
    one_long = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 5, pad, pad]]),
                "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])}
    two_short = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 5, pad, pad]]),
                 "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])}
    two_rows = {"input_ids": torch.tensor([[5, 6, pad], [7, 8, 9]]), "position_ids": torch.tensor([[0, 1, 0], [0, 1, 2]])}
    assert (attention_pairs([one_long], pad), attention_pairs([two_short], pad)) == (36, 18)
    assert attention_pairs([two_rows, one_long], pad) == 4 + 9 + 36

    model = FlopModel(matmul_params=10, attention_flops_per_pair=1)
    work = [model.flops(batch_counts([batch], pad)[0], attention_pairs([batch], pad)) for batch in (one_long, two_short)]
    assert work == [6 * 10 * 6 + 36, 6 * 10 * 6 + 18]
    assert straggler_ratio(work) == work[0] / ((work[0] + work[1]) / 2)

    from train_lib.arguments import parse_arguments
    from train_lib.model_factory import build_model_and_processor

    model_args, data_args, _ = parse_arguments(TINY)
    tiny = build_model_and_processor(model_args)[0]
    seq_len = data_args.seq_len
    assert FlopModel.of(tiny).flops(tokens=3, attended=3 * seq_len) == 3 * flops_per_token(tiny, seq_len)


def test_the_step_clock_files_each_forward_time_ratio_under_the_step_it_measured():
    from train_lib.metrics import StepClock

    clock = StepClock(1.0, None, 2)
    work = [1.0, 1.0, 1.0, 1.2, 1.4, 1.0]
    compute_of_previous = [math.nan, 9.0, 9.0, 9.0, 1.5, 1.1]  # what each step gathered: its previous step's
    for step_work, compute in zip(work, compute_of_previous):
        clock.start_step()
        clock.end_step(10, step_work, compute)
    assert clock.straggler_compute[:5] == [9.0, 9.0, 9.0, 1.5, 1.1] and math.isnan(clock.straggler_compute[5])
    summary = clock.summary()  # steady: steps 4 to 6 (3 warm-up steps, nothing compiled)
    assert summary["straggler_ratio_work"] == pytest.approx((1.2 + 1.4 + 1.0) / 3)
    assert summary["straggler_ratio_compute"] == pytest.approx((1.5 + 1.1) / 2)  # step 6's was never gathered


def test_a_step_whose_summary_is_read_late_is_timed_from_the_previous_read(monkeypatch):
    """Read late, a step ends after the next one started: its time is the time since the previous step's end (the
    loop's period), never the time since its own start (which would count the next step's work too); a step that
    starts after a pause between steps (a checkpoint's save) is timed from its own start."""
    from train_lib import metrics

    now = iter([0.0, 10.0, 14.0, 20.0, 24.0, 30.0, 100.0, 110.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(now))
    clock = metrics.StepClock(1.0, None, 1)  # loop start: 0
    clock.start_step()  # step 1 starts at 10
    clock.start_step()  # step 2 at 14
    clock.end_step(10)  # step 1 read at 20, during step 2
    clock.start_step()  # step 3 at 24
    clock.end_step(10)  # step 2 read at 30
    clock.end_step(10)  # step 3 read at once, at 100 (a checkpoint step)
    clock.start_step()  # step 4 at 110, after the save
    assert clock.seconds == [10.0, 10.0, 70.0]
    assert clock.starts == [10.0, 20.0, 30.0]


def test_a_step_in_which_another_rank_compiled_is_warm_up_for_this_one():
    """Rank 1 compiling at step 6 held rank 0 at the step's collectives: rank 0's clock, told by the step summary,
    counts steps up to 6 as warm-up although its own compile counters never moved."""
    from train_lib.metrics import StepClock

    clock = StepClock(1.0, None, 2)
    for step in range(1, 11):
        clock.start_step()
        clock.end_step(10, compiled=step == 6)
    assert clock.warmup_steps == 6 and clock.summary()["steady_state"]["steps"] == 4


def test_the_forward_timer_times_armed_forwards_and_hands_them_over_a_step_late():
    from train_lib.metrics import ForwardTimer

    model = torch.nn.Linear(4, 4)
    timer = ForwardTimer(model, torch.device("cpu"))
    with timer.timing():
        model(torch.ones(2, 4))
        model(torch.ones(2, 4))
    model(torch.ones(2, 4))  # an evaluation's forward: not counted
    assert len(timer.current) == 2
    assert math.isnan(timer.previous_step_ms())  # the first step: nothing before it
    with timer.timing():
        model(torch.ones(2, 4))
    first_step_ms = sum(timer.finished)
    assert timer.previous_step_ms() == first_step_ms > 0
    assert timer.finished and not timer.current


def test_two_processes_reading_each_summary_a_step_late_train_exactly_as_reading_it_at_once(tmp_path):
    """Two ranks that read each step's summary during the next step (the skip decided on the device from every
    rank's gathered loss and gradient norm, so the same on both) train bit-identically to reading it at once: the
    same samples in each step, losses, skipped steps and weights; with a non-finite step, and a checkpoint that one
    rank saves slowly."""
    args = ["--max_steps", 8, "--inject_nan_steps", "3", "--checkpoint_every", 4]
    late, at_once = tmp_path / "late", tmp_path / "at_once"
    run("--output_dir", late, *args, "--test_slow_save_rank", 1, "--test_slow_save_seconds", 0.5)
    run("--output_dir", at_once, *args, "--test_read_summaries_at_once", "true")
    assert digests(late) == digests(at_once) and len(digests(late)) == 8
    assert [s["loss"] for s in read_steps(late)] == [s["loss"] for s in read_steps(at_once)]
    assert read_steps(late)[2]["loss"] is None
    assert json.loads((late / "report.json").read_text())["skipped_steps"] == 1
    weights, reference = final_weights(late), final_weights(at_once)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
