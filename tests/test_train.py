"""examples/train.py on CPU: it learns, resumes bit-exactly after SIGKILL, skips NaN steps, trains LoRA, runs
data-parallel over 2 CPU processes with the same loss curve as 1 process, counts FLOPs before the model is sharded,
and shows skipped examples while training (tests/test_train_distributed.py has the multi-process resume tests)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.trace_report import load, step_table
from tests.conftest import fresh_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from train_lib.metrics import read_steps

# A smaller model and shorter rows than the default run, so each test trains in seconds.
TINY = [
    "--text_hidden_size", "64", "--text_intermediate_size", "128", "--text_heads", "2", "--text_kv_heads", "1",
    "--vision_hidden_size", "32", "--vision_intermediate_size", "64", "--vision_heads", "2",
    "--seq_len", "256", "--rows_per_batch", "1", "--eval_samples", "4", "--eval_before", "false",
    "--report_to", "none", "--warmup_steps", "5",
]
PHASES = ("next_batch", "forward_backward", "step_summary", "optimizer", "bookkeeping")  # the loop's trainer/... ranges
REPORT_KEYS = {"steps", "samples_seen", "tokens_seen", "wall_seconds", "tokens_per_second_wall",
               "tokens_per_second_steady", "steady_state", "compile_seconds", "graph_count", "host_syncs_per_step",
               "train_loss_first", "train_loss_last", "skipped", "eval_exact_match", "eval_exact_match_blank_images"}


def free_port() -> str:
    """A port no other test (nor another checkout's test run) is using now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run_in_process(*args):
    """Call train.main in this process, with accelerate's process-wide state reset before and after."""
    import train

    with fresh_accelerate_state():
        return train.main([*TINY, *map(str, args)])


def train_command(*args, launcher=(sys.executable,)):
    return [*launcher, str(EXAMPLES / "train.py"), *TINY, *map(str, args)]


def child_env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("short-run")
    report = run_in_process("--output_dir", output_dir, "--max_steps", 30, "--learning_rate", 3e-3)
    return output_dir, report


def test_a_30_step_run_lowers_the_loss(short_run):
    _, report = short_run
    assert report["steps"] == 30
    assert report["train_loss_last"] < 0.6 * report["train_loss_first"]


def test_report_json_has_the_documented_keys(short_run):
    output_dir, _ = short_run
    report = json.loads((output_dir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["tokens_seen"] > 0 and report["samples_seen"] > 0 and report["skipped"] == {}


def test_final_folder_reloads_with_auto_classes_and_the_same_logits(short_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from processing.scenes import scenes_eval_examples

    output_dir, _ = short_run
    final = output_dir / "final"
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    images, caption = scenes_eval_examples(1, seed=0)[0]
    inputs = processor(text=processor.image_token + caption, images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert not any(f.endswith(".bin") for f in os.listdir(final))


def test_injected_nan_steps_are_skipped_and_counted(tmp_path):
    report = run_in_process("--output_dir", tmp_path, "--max_steps", 8, "--inject_nan_steps", "3,4")
    assert report["steps"] == 8
    assert report["skipped_steps"] == 2


def test_summaries_read_a_step_late_train_exactly_as_read_at_once(tmp_path, monkeypatch):
    """Reading each step's summary during the next step (the optimizer step queued first, a non-finite step skipped
    on the device by fused AdamW's found_inf, the schedule advanced when the summary is read) gives bit-identical
    weights, losses and skip counts to reading it at once; with non-finite steps, a checkpoint and an evaluation
    inside the run, which must be read at once."""
    from train_lib import loop

    late_reads = []
    real = loop.Trainer.settle_previous
    monkeypatch.setattr(loop.Trainer, "settle_previous", lambda self: late_reads.append(self.step_number) or real(self))
    args = ["--max_steps", 9, "--inject_nan_steps", "3,4", "--checkpoint_every", 5, "--eval_every", 7,
            "--eval_split", "eval", "--eval_generate_samples", 1, "--eval_max_new_tokens", 2, "--seed", 3]
    late = run_in_process("--output_dir", tmp_path / "late", *args)
    assert late_reads == [2, 3, 4, 5, 7, 9]  # steps 1-4, 6 and 8 were read late, in the next step; 5, 7 and 9 at once
    at_once = run_in_process("--output_dir", tmp_path / "at_once", *args, "--test_read_summaries_at_once", "true")
    assert late_reads == [2, 3, 4, 5, 7, 9]
    assert late["skipped_steps"] == at_once["skipped_steps"] == 2
    assert [s["loss"] for s in read_steps(tmp_path / "late")] == [s["loss"] for s in read_steps(tmp_path / "at_once")]
    assert read_steps(tmp_path / "late")[2]["loss"] is None
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("late", "at_once")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert (tmp_path / "late" / "checkpoints" / "step-5").is_dir()


def test_profile_steps_writes_a_trace_and_the_loops_phases(tmp_path):
    run_in_process("--output_dir", tmp_path, "--max_steps", 3, "--profile_steps", 2, "--eval_samples", 0)
    table = (tmp_path / "profile" / "rank0.txt").read_text()
    assert table.startswith("rank 0: the last 2 steps")
    for phase in PHASES:
        # Step 2's summary is read late, in step 3, which also reads its own (the last step's is read at once).
        calls = "(3 calls)" if phase in ("step_summary", "bookkeeping") else "(2 calls)"
        assert f"trainer/{phase}" in table and calls in table.split(f"trainer/{phase}")[1].splitlines()[0]
    assert "aten::mm" in table
    with gzip.open(tmp_path / "profile" / "rank0.trace.json.gz") as trace:
        assert any(event.get("name") == "trainer/optimizer" for event in json.load(trace)["traceEvents"])
    steps = step_table(load(str(tmp_path / "profile" / "rank0.trace.json.gz")))  # benchmarks/trace_report.py reads it
    assert len(steps) == 2 and all(set(step["host_phases_ms"]) == set(PHASES) for step in steps)


def test_every_forward_gets_its_batchs_host_layout(tmp_path, monkeypatch):
    """The loop reads each micro-batch's image grids and targets on the host and hands them to the model, which
    then reads nothing back from the device (tests/test_host_layout.py); with images in the toy data."""
    from train_lib import loop

    layouts = []
    real = loop.HostBatchLayout.of

    def recording(batch, config):
        layouts.append(real(batch, config))
        return layouts[-1]

    monkeypatch.setattr(loop.HostBatchLayout, "of", staticmethod(recording))
    run_in_process("--output_dir", tmp_path, "--max_steps", 3, "--gradient_accumulation_steps", 2,
                   "--eval_samples", 0, "--loss_chunk_size", 64)
    assert len(layouts) == 6
    assert any(layout.image_shapes for layout in layouts) and all(len(l.target_positions) for l in layouts)


def test_too_many_consecutive_bad_steps_stop_the_run(tmp_path):
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        run_in_process("--output_dir", tmp_path, "--max_steps", 8, "--inject_nan_steps", "3,4", "--max_bad_steps", 2)


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    common = ["--max_steps", 12, "--checkpoint_every", 4, "--keep_checkpoints", 5, "--eval_samples", 0]
    reference = tmp_path / "uninterrupted"
    subprocess.run(train_command("--output_dir", reference, *common), env=child_env(), check=True,
                   capture_output=True, timeout=600)

    resumed = tmp_path / "killed"
    victim = subprocess.Popen(train_command("--output_dir", resumed, *common), env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "step-4").exists():
        assert victim.poll() is None, "the run ended before its step-4 checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (resumed / "final").exists()

    subprocess.run(train_command("--output_dir", resumed, *common, "--resume_from_checkpoint", "latest"),
                   env=child_env(), check=True, capture_output=True, timeout=600)
    expected, actual = final_weights(reference), final_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert [(r["step"], r["digest"], r["loss"]) for r in read_steps(resumed)] == [
        (r["step"], r["digest"], r["loss"]) for r in read_steps(reference)]


def test_lora_run_saves_an_adapter_that_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base_run = tmp_path / "base"
    run_in_process("--output_dir", base_run, "--max_steps", 2)
    lora_run = tmp_path / "lora"
    run_in_process("--output_dir", lora_run, "--max_steps", 10, "--model_name_or_path", base_run / "final",
                   "--use_lora", "true", "--lora_r", 4, "--learning_rate", 1e-2, "--save_merged_lora", "true")
    final = lora_run / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()

    base = AutoModelForImageTextToText.from_pretrained(base_run / "final").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_run / "final"), final).eval()
    merged = AutoModelForImageTextToText.from_pretrained(final / "merged").eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        base_logits, adapter_logits = base(input_ids=ids).logits, with_adapter(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits)  # the adapter learned something
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)


def test_resume_with_another_num_workers_goes_on_without_repeating_a_sample(tmp_path):
    """The data is re-dealt to the new number of loader workers (map-style data)."""
    common = ["--output_dir", tmp_path, "--eval_samples", 0, "--log_sample_ids", "true", "--checkpoint_every", 2]
    run_in_process(*common, "--max_steps", 2)
    run_in_process(*common, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--num_workers", 1)
    records = read_steps(tmp_path)
    seen = [i for r in records for rank_ids in r["sample_ids"] for i in rank_ids]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and len(seen) == len(set(seen))


class BothShardsInOneProcess:
    """Rank 0's and rank 1's batches of a 2-process run, alternately: one process, two micro-batches per step,
    sees exactly what the two processes see together."""

    def __init__(self, config, processor, seq_len, rank, world_size):
        from processing.data import build_train_dataloader

        assert (rank, world_size) == (0, 1)
        self.shards = [build_train_dataloader(config, processor, seq_len, rank=r, world_size=2) for r in range(2)]
        self.skipped, self.skip_examples, self.samples_seen, self.last_sample_ids = {}, {}, 0, []

    def __iter__(self):
        iterators = [iter(shard) for shard in self.shards]
        while True:
            for shard, iterator in zip(self.shards, iterators):
                batch = next(iterator)
                self.last_sample_ids = shard.last_sample_ids
                yield batch


def test_two_cpu_processes_give_the_loss_curve_of_one_with_the_same_global_batch(tmp_path, monkeypatch):
    import train

    steps = ["--max_steps", 6, "--learning_rate", 3e-3]
    two = tmp_path / "two"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    result = subprocess.run(train_command("--output_dir", two, *steps, launcher=torchrun), env=child_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    two_report = json.loads((two / "report.json").read_text())
    assert "MULTI_CPU on 2 process" in result.stdout  # really synchronised, not two lone copies

    monkeypatch.setattr(train, "build_train_dataloader", BothShardsInOneProcess)
    one_report = run_in_process("--output_dir", tmp_path / "one", *steps, "--gradient_accumulation_steps", 2)
    assert one_report["tokens_seen"] == two_report["tokens_seen"]
    torch.testing.assert_close(torch.tensor(one_report["loss_curve"]), torch.tensor(two_report["loss_curve"]),
                               atol=1e-4, rtol=1e-4)


def write_alternating_parquet(path: str, samples: int) -> str:
    """Interleaved-format rows: even rows a scene image and its caption, odd rows text only."""
    import io

    from datasets import Dataset, Features, Image, List, Value

    from processing.scenes import ScenesSource

    scenes, texts, images = ScenesSource("train", samples, 0), [], []
    for index in range(samples):
        example = scenes[index]
        caption = example["text"].split("|>")[-1]
        if index % 2 == 0:
            png = io.BytesIO()
            example["images"][0].save(png, format="PNG")
            texts.append([None, caption])
            images.append([{"bytes": png.getvalue(), "path": None}, None])
        else:
            texts.append([f"no image here: {caption}"])
            images.append([None])
    features = Features({"texts": List(Value("string")), "images": List(Image())})
    Dataset.from_dict({"texts": texts, "images": images}, features=features).to_parquet(path)
    return path


def test_a_rank_without_images_trains_in_step_with_a_rank_with_images(tmp_path):
    """2 CPU processes (gloo DDP): rank 0 reads only image samples, rank 1 only text. DDP fails the step if a
    parameter has a gradient on one rank and none on the other; the model's blank-image pass prevents that.

    A stream of one file is split across ranks example by example (row i to rank i % 2), so alternating rows give
    each rank one kind; a stream's sample id is the row, which steps.jsonl shows per rank."""
    data = write_alternating_parquet(str(tmp_path / "alternating.parquet"), samples=64)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    run = tmp_path / "run"
    result = subprocess.run(
        train_command("--output_dir", run, "--max_steps", 4, "--dataset", "parquet", "--data_files", data,
                      "--streaming", "true", "--data_format", "interleaved", "--eval_samples", 0,
                      "--log_sample_ids", "true", launcher=torchrun),
        env=child_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 4 and report["skipped"] == {}
    for record in read_steps(run):
        with_images, text_only = record["sample_ids"]
        assert with_images and all(i % 2 == 0 for i in with_images), record
        assert text_only and all(i % 2 == 1 for i in text_only), record


def partition_like_zero3(model) -> None:
    """What ZeRO-3 leaves on a rank: every parameter's local tensor empty, its full size in `ds_numel`."""
    for parameter in model.parameters():
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0, dtype=parameter.dtype)


def test_flops_and_parameter_counts_see_through_partitioned_parameters():
    from train_lib.arguments import parse_arguments
    from train_lib.model_factory import build_model_and_processor, parameter_counts
    from train_lib.reporting import flops_per_token

    model_args, data_args, _ = parse_arguments(TINY)
    model, _ = build_model_and_processor(model_args)
    whole = flops_per_token(model, data_args.seq_len), parameter_counts(model)
    partition_like_zero3(model)
    assert (flops_per_token(model, data_args.seq_len), parameter_counts(model)) == whole


def test_the_trainer_counts_flops_before_prepare_partitions_the_model(monkeypatch):
    """`accelerate.prepare` under ZeRO-3 or FSDP2 leaves each rank a shard; counted after it, MFU read 0.6 %."""
    import train
    from accelerate import Accelerator
    from train_lib.arguments import parse_arguments
    from train_lib.metrics import model_flops_utilization
    from train_lib.model_factory import build_model_and_processor
    from train_lib.reporting import flops_per_token

    model_args, data_args, train_args = parse_arguments(TINY)
    torch.manual_seed(0)
    expected = flops_per_token(build_model_and_processor(model_args)[0], data_args.seq_len)
    prepare = Accelerator.prepare

    def prepare_then_shard(self, model, *rest):
        model, *rest = prepare(self, model, *rest)
        for parameter in model.parameters():
            parameter.data = torch.empty(0, dtype=parameter.dtype)  # a shard of nothing, no ds_numel to help
        return (model, *rest)

    monkeypatch.setattr(Accelerator, "prepare", prepare_then_shard)
    with fresh_accelerate_state():
        accelerator = train.make_accelerator(train_args)
        *_, counts = train.build_training(accelerator, model_args, data_args, train_args)
    assert counts.flops_per_token == expected
    # The peak is one device's, times the processes.
    assert model_flops_utilization(2e3, expected, 1e12, 4) == pytest.approx(2e3 * expected / 4e12)


def test_a_run_on_mostly_bad_data_stops_and_names_the_reason(tmp_path):
    """Rows of 24 tokens: about three scenes in four do not fit. The skip-rate guard, judged on every rank's counts
    after each step, stops the run once enough examples were read, instead of training on the few that fit."""
    from processing.data import DataQualityError

    with pytest.raises(DataQualityError, match=r"Most were too_long.*--seq_len"):
        run_in_process("--output_dir", tmp_path, "--max_steps", 1000, "--seq_len", 24, "--eval_samples", 0)
    assert 0 < len(read_steps(tmp_path)) < 1000


def test_skips_show_in_the_progress_bar_and_the_trackers(tmp_path, capsys):
    """Rows of 32 tokens: about a third of the scenes are too long, under the guard's limit; the run goes on and
    shows the count as it trains."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = run_in_process("--output_dir", tmp_path, "--max_steps", 6, "--seq_len", 32, "--eval_samples", 0,
                            "--report_to", "tensorboard", "--log_every", 1)
    skipped = report["skipped"]["too_long"]
    assert skipped > 0 and f"skipped={skipped}" in capsys.readouterr().err
    events_file = next((tmp_path / "logs").rglob("events.out.tfevents*"))
    scalars = EventAccumulator(str(events_file)).Reload()
    assert scalars.Scalars("skipped/too_long")[-1].value == skipped
    assert scalars.Scalars("skipped_examples")[-1].value == skipped


def test_the_loop_runs_on_one_intra_op_thread_on_an_accelerator_and_gives_the_threads_back():
    """On a GPU the loop's host ops are small and the loader's workers share the cores: one intra-op thread (see
    `one_intra_op_thread_unless_on_cpu`); a CPU run keeps its threads, and the threads come back after the loop."""
    from train_lib.loop import one_intra_op_thread_unless_on_cpu

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_intra_op_thread_unless_on_cpu(torch.device("cuda", 0)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_intra_op_thread_unless_on_cpu(torch.device("cpu")):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_intra_op_thread_unless_on_cpu(torch.device("cuda", 0)):
            raise RuntimeError("a failed step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_deepspeed_takes_its_micro_batch_accumulation_and_clipping_from_the_run():
    """Our accelerate configs leave DeepSpeed's accumulation and clipping out, and train.py fills them in from the
    run, so the 1B config's 4 micro-batches a step stay 4 under ZeRO (an accelerate config that set 1 made them 1,
    with a log line only). A DeepSpeed value that disagrees with the run is refused, naming both."""
    import train
    import yaml
    from train_lib.arguments import parse_arguments

    _, data_args, train_args = parse_arguments(
        [*TINY, "--rows_per_batch", "3", "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5"])
    config = {"gradient_accumulation_steps": "auto"}  # clipping left out, as in our accelerate configs
    train.match_deepspeed_to_run(config, data_args, train_args)
    assert config == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    agreeing = {"gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    train.match_deepspeed_to_run(agreeing, data_args, train_args)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps 1, the run --gradient_accumulation_steps 4"):
        train.match_deepspeed_to_run({"gradient_accumulation_steps": 1}, data_args, train_args)
    with pytest.raises(ValueError, match=r"gradient_clipping 1.0, the run --max_grad_norm 0.5"):
        train.match_deepspeed_to_run({"gradient_clipping": 1.0}, data_args, train_args)
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        deepspeed = yaml.safe_load((EXAMPLES / "accelerate" / name).read_text())["deepspeed_config"]
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(deepspeed), name


def test_accumulation_set_by_the_launcher_against_the_run_is_refused(monkeypatch):
    """`accelerate launch --gradient_accumulation_steps` (or an accelerate config's deepspeed_config) reaches the
    Accelerator through the environment and would override the run's value without a word."""
    import train
    from train_lib.arguments import parse_arguments

    *_, train_args = parse_arguments([*TINY, "--gradient_accumulation_steps", "4"])
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with fresh_accelerate_state(), pytest.raises(
            ValueError, match=r"launcher sets gradient_accumulation_steps 1.*--gradient_accumulation_steps 4"):
        train.make_accelerator(train_args)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with fresh_accelerate_state():
        assert train.make_accelerator(train_args).gradient_accumulation_steps == 4
