"""The training loop: `Trainer.train()` runs `train_step` until `max_steps` or a stop request.

A step, on every rank:
    1. `gradient_accumulation_steps` micro-batches from the loader, with their sample ids;
    2. one all-reduce of the target count (every rank's loss is a sum over the global batch's targets);
    3. `forward_backward_step` for each micro-batch; the gradient clip;
    4. one all-gather of the step's summary (`step_sync`): the loss, the gradient norm, the counts, the stop flag,
       each rank's modelled work and forward time (the straggler ratios);
    5. the optimizer and scheduler step, unless a loss or the gradient norm was not finite on any rank.

The summary is read a step late where it can be: with fused AdamW (the trainer's optimizer) the skip decision stays
on the device (`found_inf`: the update, the moments and the step count are left as they were), so the optimizer
step is queued at once and the summary read during the next step, after that step's forward and backward are
queued, and before its optimizer step: the schedule advances for the previous step then, when its outcome is known.
The host then never waits for a drained device, nor the device for the host between steps (on one H100 the device
idled ~100 ms of a 370 ms step waiting so). A step that saves a checkpoint, evaluates or ends the run is read at
once (`may_read_late`), and so is every step under DeepSpeed (its own step) or fp16 (GradScaler's).

Host syncs per step: 1, the summary's copy to the host (`HOST_SYNCS_PER_STEP`). Targets, tokens and samples are
counted on the host from the CPU batch, and so is the step's modelled work (`reporting.FlopModel`); the loss and
gradient norm stay on the device until the summary, and the forward times (`ForwardTimer`) a step longer. Under
DeepSpeed, which runs its optimizer step inside `backward`, each micro-batch's loss is also checked before its
backward (one reduce and one host sync each), unless DeepSpeed's own step skips non-finite gradients
(`deepspeed_skips_nonfinite_steps`: ZeRO from 0.19.8); elsewhere a NaN that reached DeepSpeed's step would be
applied.

Non-finite steps. Elsewhere the check comes after the backward: a NaN loss yields NaN gradients (DDP spreads them to
every rank), the summary shows it on every rank, and the step is skipped everywhere: no optimizer or scheduler step,
gradients zeroed (set to None), so the NaN never reaches the weights or Adam's moments. (Under fp16, gradients that
overflowed with a finite loss go to GradScaler's step, which skips the update itself and lowers its scale.)

Around the steps: `StepClock` (steady-state speed), `StepLog` (steps.jsonl), `Checkpointer`, `processing.data`'s
`SkipRateGuard`, the progress bar (one per node) and the trackers (the main process).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from torch.profiler import record_function
from tqdm.auto import tqdm

from modeling_llama3_siglip2.host_layout import HostBatchLayout, count_targets, host_to_device
from processing.data import SKIP_REASONS
from processing.data.health import SkipRateGuard

from .checkpoints import save_checkpoint
from .gc_policy import GarbageCollection
from .metrics import ForwardTimer, StepClock, StepLog
from .preemption import StopRequested, batches_through_sigterm
from .profiling import LastStepsProfiler
from .reporting import FlopModel
from .step_sync import PendingSummary, StepSummary, finite_or_none, start_step_summary

HOST_SYNCS_PER_STEP = 1


@dataclass
class LoopOptions:
    """Testing aids of the loop, kept out of a run's config and `--help`."""

    test_slow_save_rank: int | None = None  # testing aid: this rank writes its part of each checkpoint late ...
    test_slow_save_seconds: float = 0.0  # ... by this much
    test_read_summaries_at_once: bool = False  # testing aid: never read a step's summary late (`may_read_late`)


def split_loop_options(argv: list[str]) -> tuple[LoopOptions, list[str]]:
    """Take the `LoopOptions` flags out of `argv`; the rest is the run's own command line."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(LoopOptions, add_help=False, allow_abbrev=False)
    options, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return options, rest


def slow_down_checkpoint_writes(accelerator, options: LoopOptions) -> None:
    """Testing aid: one rank writes its part of every checkpoint `test_slow_save_seconds` after the others."""
    if options.test_slow_save_rank is not None and accelerator.process_index == options.test_slow_save_rank:
        seconds = options.test_slow_save_seconds
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: time.sleep(seconds))


def batch_counts(micro_batches, pad_token_id: int) -> tuple[int, int]:
    """(real tokens, samples) in packed CPU batches, on the host; a sample starts where its position is 0."""
    tokens = samples = 0
    for batch in micro_batches:
        real = batch["input_ids"] != pad_token_id
        tokens += int(real.sum())
        samples += int(((batch["position_ids"] == 0) & real).sum())
    return tokens, samples


def attention_pairs(micro_batches, pad_token_id: int) -> int:
    """(token, token it attends over) pairs in packed CPU batches: each sample's length squared, summed (every token
    over its whole sample, as the MFU counts every token over the whole row). One long sample costs more than two
    short ones of the same tokens: packing's attention imbalance between ranks. Padding is left out, as from the
    tokens."""
    pairs = 0
    for batch in micro_batches:
        real = (batch["input_ids"] != pad_token_id).flatten()
        starts = (batch["position_ids"] == 0).flatten() & real
        sample_of_token = torch.cumsum(starts, 0)[real]  # every row begins with a sample: a new number per sample
        pairs += int((torch.bincount(sample_of_token) ** 2).sum())
    return pairs


def skip_vector(skipped: Counter) -> list[int]:
    """Skip counts by reason, in `SKIP_REASONS` order, then everything else (unforeseen errors) in one bucket."""
    known = [skipped.get(reason, 0) for reason in SKIP_REASONS]
    return [*known, sum(skipped.values()) - sum(known)]


@contextlib.contextmanager
def one_intra_op_thread_unless_on_cpu(device: torch.device):
    """On an accelerator, the loop's host work is small ops (batch layouts, counts: tens of thousands of elements)
    between kernel launches, while the loader's workers decode images on the same cores. A pool of intra-op threads
    there waits for threads the workers pushed off the cores: on one H100 with 8 workers, four 16k-element indexing
    ops took 7-11 ms each (0.05 ms alone) and two `repeat_interleave` 5-8 ms, inside a host-bound step. On 2 busy
    CPU cores the same function's p90 is 5-12 ms with 2 threads and 0.8 ms with one. The CPU's own runs keep theirs."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def skips_on_device(torch_optimizer, accelerator) -> bool:
    """Whether a non-finite step can be skipped without the host: fused Adam(W) takes the decision as `found_inf`.
    DeepSpeed steps inside its own backward; fp16's GradScaler sets `found_inf` itself."""
    return (isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW)
            and bool(torch_optimizer.defaults.get("fused"))
            and accelerator.state.deepspeed_plugin is None and accelerator.scaler is None)


def deepspeed_skips_nonfinite_steps(engine) -> bool:
    """Whether DeepSpeed's own step skips a step whose gradients are not finite, so that a NaN loss may go through
    the backward, every micro-batch of it. From DeepSpeed 0.19.8 (0.19.6 applied such a step under ZeRO-3): ZeRO-3
    takes the gradient norm every step and, when it is not finite, leaves the weights, the optimizer state and the
    learning rate as they were (`stage3.py`, `step`); ZeRO-1 and -2 do the same when they take the norm (their
    default) and, in bf16, with `bf16.check_grad_overflow` (its default). Any other optimizer of DeepSpeed's keeps
    the trainer's check before the backward."""
    from deepspeed import __version__
    from packaging.version import Version

    if Version(__version__).release < (0, 19, 8):
        return False
    if engine.zero_optimization_stage() == 3:
        return True
    optimizer = engine.optimizer  # ZeRO-1/2's DeepSpeedZeroOptimizer carries the two switches
    return bool(getattr(optimizer, "compute_grad_norm", False)) and (
        getattr(optimizer, "dtype", None) != torch.bfloat16 or bool(getattr(optimizer, "check_grad_overflow", False)))


def nonfinite_on_any_rank(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is NaN or infinite on any rank (one all-reduce and a host sync). A MAX of "not finite":
    accelerate's `reduce` knows "mean", "sum" and "max", and sums for any other name."""
    return bool(accelerator.reduce((~torch.isfinite(loss.detach())).float(), "max"))


def skip_counts(vector) -> dict[str, int]:
    return {reason: int(count) for reason, count in zip((*SKIP_REASONS, "unexpected_error"), vector) if count}


class Checkpointer:
    """Saves a resumable checkpoint every `every` steps, and when the run is asked to stop."""

    def __init__(self, accelerator, train_args, pipeline, model, processor):
        self.accelerator, self.pipeline = accelerator, pipeline
        self.output_dir, self.every = train_args.output_dir, train_args.checkpoint_every
        self.keep = train_args.keep_checkpoints
        unwrapped = accelerator.unwrap_model(model)
        # What `hf/` needs for an offline export of the checkpoint.
        self.hf_files = {"model_config": unwrapped.config, "processor": processor,
                         "generation_config": getattr(unwrapped, "generation_config", None)}

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, state: dict) -> str:
        state["data"] = gather_object([self.pipeline.state_dict()])  # every rank's position, in rank order
        state["world_size"] = self.accelerator.num_processes
        return save_checkpoint(self.accelerator, self.output_dir, state["step"], state, self.keep, **self.hf_files)


class Trainer:
    """Runs the optimisation from `state` (a fresh run's or a checkpoint's) on prepared objects."""

    def __init__(self, accelerator, model, optimizer, scheduler, pipeline, processor, state: dict, train_args,
                 options: LoopOptions, flops_per_token: float, peak_flops_per_device: float | None,
                 guard: SkipRateGuard | None = None, evaluate=None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.pipeline, self.state, self.args, self.options = pipeline, state, train_args, options
        self.pad_token_id = processor.pad_token_id
        self.evaluate = evaluate  # step -> figures or None: the periodic evaluation (every process calls it)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # after prepare: FSDP2's DTensors
        self.accumulation = accelerator.gradient_accumulation_steps  # DeepSpeed's config may have set it
        self.deepspeed = accelerator.state.deepspeed_plugin is not None
        # Under DeepSpeed, which steps inside `backward`, a NaN loss must not reach a step that would apply it.
        self.check_loss_before_backward = self.deepspeed and not deepspeed_skips_nonfinite_steps(model)
        self.nan_steps = {int(s) for s in train_args.inject_nan_steps.split(",") if s.strip()}
        self.step_number = state["step"]  # the step being run; state["step"] counts the steps read and recorded
        self.torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
        self.late_reads = skips_on_device(self.torch_optimizer, accelerator) and not options.test_read_summaries_at_once
        self.pending: tuple[PendingSummary, list] | None = None  # a step read late: its summary and sample ids
        self.eval_every = train_args.eval_every if evaluate is not None else 0
        self.checkpointer = Checkpointer(accelerator, train_args, pipeline, model, processor)
        self.stop = StopRequested()
        self.guard = guard or SkipRateGuard()  # judged on every rank's counts: all ranks raise at the same step
        self.clock = StepClock(flops_per_token, peak_flops_per_device, accelerator.num_processes)
        unwrapped = accelerator.unwrap_model(model)
        self.flop_model = FlopModel.of(unwrapped)  # the MFU's formula (its flops_per_token), for each rank's work
        self.forward_timer = ForwardTimer(unwrapped, accelerator.device)
        # The batch's image grids and target positions go to the model read on the host (no host sync in the
        # forward); through PEFT's wrappers the method is the base model's.
        self.host_layout = getattr(unwrapped, "host_layout", None)
        self.model_config = unwrapped.config
        self.step_log = StepLog(train_args.output_dir, state["step"], enabled=accelerator.is_main_process)
        self.consecutive_bad = 0
        self.skipped_examples: dict[str, int] = {}
        self.eval_loss = None  # the latest periodic evaluation's, for the progress bar
        self.batches = batches_through_sigterm(pipeline)

    # -- one step --------------------------------------------------------------------------------------------------

    def next_micro_batches(self) -> tuple[list, list]:
        micro_batches, sample_ids = [], []
        for _ in range(self.accumulation):
            micro_batches.append(next(self.batches))
            sample_ids += self.pipeline.last_sample_ids
        return micro_batches, sample_ids

    def global_target_count(self, micro_batches) -> torch.Tensor:
        """Targets of the whole global batch, left on the device: every rank's loss is divided by it."""
        local = sum(int(count_targets(batch["labels"], self.model_config)) for batch in micro_batches)  # on the host
        local = host_to_device(torch.tensor([local]), self.accelerator.device)[0]
        return self.accelerator.reduce(local, "sum")

    def forward_backward_step(self, batch, targets: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss (this rank's targets over the global target count), backpropagated."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            layout = contextlib.nullcontext()
            if self.host_layout is not None:
                layout = self.host_layout(HostBatchLayout.of(batch, self.model_config))
            # non_blocking: a blocking copy would wait for the GPU to finish the previous micro-batch (a host sync).
            batch = batch.to(accelerator.device, non_blocking=True)
            with self.forward_timer.timing(), layout:
                loss = self.model(**batch, num_items_in_batch=targets).loss
            if self.step_number in self.nan_steps:
                loss = loss * float("nan")
            if self.check_loss_before_backward and nonfinite_on_any_rank(accelerator, loss):
                return loss.detach()  # no backward: DeepSpeed would apply the NaN in its own step
            # accelerate averages gradients over processes and divides by the accumulation steps; the loss is
            # already a sum over all of them divided by their target count, so undo both.
            accelerator.backward(loss * accelerator.num_processes * self.accumulation)
        return loss.detach()

    def host_syncs_per_step(self) -> int:
        """The loop's host syncs in one step (see the module docstring): one more per micro-batch where the loss is
        checked before the backward."""
        return HOST_SYNCS_PER_STEP + (self.accumulation if self.check_loss_before_backward else 0)

    def clip_gradients(self):
        if self.deepspeed:
            return None  # DeepSpeed clips inside its step, at --max_grad_norm (train.py's match_deepspeed_to_run)
        return self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm)

    def train_step(self, micro_batches, sample_ids, read_late: bool) -> StepSummary | None:
        """One optimizer step; its summary, or None when it is to be read late (during the next step)."""
        tokens, samples = batch_counts(micro_batches, self.pad_token_id)  # on the host, before the batches move
        work = self.flop_model.flops(tokens, attention_pairs(micro_batches, self.pad_token_id))
        targets = self.global_target_count(micro_batches)
        with record_function("trainer/forward_backward"):
            loss = torch.stack([self.forward_backward_step(batch, targets) for batch in micro_batches]).sum()
        grad_norm = self.clip_gradients()
        pending = start_step_summary(
            self.accelerator, loss, grad_norm, tokens=tokens, samples=samples, sample_ids=sample_ids,
            samples_seen=self.pipeline.samples_seen, skipped=skip_vector(self.pipeline.skipped),
            stop=self.stop.requested, work=work, compute_ms=self.forward_timer.previous_step_ms(),
            compiled=self.clock.compiled_this_step())
        if self.pending is not None:  # the previous step's, now that this step's work is queued behind it
            read_late = self.settle_previous() and read_late
        if read_late:
            with record_function("trainer/optimizer"):
                self.optimizer_step_skipped_on_device(pending)
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = (pending, sample_ids)
            return None
        with record_function("trainer/step_summary"):  # the host waits here for the step's device work
            summary = pending.read()
        with record_function("trainer/optimizer"):
            self.optimizer_step(summary)
        self.optimizer.zero_grad(set_to_none=True)
        return summary

    def settle_previous(self) -> bool:
        """Read the step read late, advance the schedule for it if it was taken, and record it; False when it asks
        the run to stop (this step is then read at once, and the run stops after it)."""
        pending, sample_ids = self.pending
        self.pending = None
        with record_function("trainer/step_summary"):
            summary = pending.read()
        if summary.finite:
            self.scheduler.step()  # before this step's optimizer step: the learning rate it uses
        self.settle(summary, sample_ids)
        return not summary.stop

    def optimizer_step_skipped_on_device(self, pending: PendingSummary) -> None:
        """Queue the optimizer step with the skip decision left on the device (`skips_on_device`)."""
        self.torch_optimizer.found_inf = pending.found_inf()
        try:
            self.optimizer.step()
        finally:
            del self.torch_optimizer.found_inf

    def may_read_late(self, step: int) -> bool:
        """Whether step `step`'s summary may wait for the next step: not where the step must be complete when it
        ends (a checkpoint, an evaluation, the last step)."""
        return (self.late_reads and step < self.args.max_steps and not self.checkpointer.due(step)
                and not (self.eval_every and step % self.eval_every == 0))

    def optimizer_step(self, summary) -> None:
        if summary.finite:
            self.optimizer.step()
            self.scheduler.step()
        elif summary.loss_finite and self.accelerator.scaler is not None:
            # fp16: the gradients overflowed. GradScaler's step sees it, skips the update and lowers its scale;
            # without it the scale would stay too high and every later step overflow too.
            self.optimizer.step()

    # -- the loop --------------------------------------------------------------------------------------------------

    def train(self) -> bool:
        """Train to `max_steps` (True), or until SIGTERM, after saving a checkpoint (False)."""
        accelerator, state = self.accelerator, self.state
        self.progress = tqdm(total=self.args.max_steps, initial=state["step"], file=sys.stderr,
                             disable=not accelerator.is_local_main_process)
        self.model.train()
        self.collector = GarbageCollection(self.args.gc_every)
        profiler = LastStepsProfiler(self.args.profile_steps, self.args.max_steps, self.args.output_dir,
                                     accelerator.process_index, accelerator.device)
        try:
            with one_intra_op_thread_unless_on_cpu(accelerator.device):
                return self.run_steps(profiler)
        finally:
            profiler.finish()
            self.collector.close()
            self.progress.close()
            self.step_log.close()

    def run_steps(self, profiler) -> bool:
        """The steps of `train`: each settled (read and recorded) at once or a step late, then evaluated, saved."""
        accelerator, state = self.accelerator, self.state
        while self.step_number < self.args.max_steps:
            self.step_number += 1
            profiler.before_step(self.step_number)
            self.clock.start_step()
            with record_function("trainer/next_batch"):
                micro_batches, sample_ids = self.next_micro_batches()
            summary = self.train_step(micro_batches, sample_ids, self.may_read_late(self.step_number))
            if summary is None:
                continue  # read during the next step
            self.settle(summary, sample_ids)
            if self.evaluate is not None:
                figures = self.evaluate(state["step"]) or {}
                self.eval_loss = figures.get("eval_loss", self.eval_loss)
            if self.checkpointer.due(state["step"]) or summary.stop:
                self.checkpointer.save(state)
            if summary.stop:
                accelerator.print(f"SIGTERM: saved step {state['step']} and stopping; resume with "
                                  "--resume_from_checkpoint latest")
                return False
        return True

    def settle(self, summary: StepSummary, sample_ids: list) -> None:
        """A step's summary has been read: time it, count it, check it and show it."""
        self.clock.end_step(summary.tokens, summary.straggler_work, summary.straggler_compute,
                            compiled=summary.compiled)
        with record_function("trainer/bookkeeping"):
            self.record(summary, sample_ids, self.progress)
            self.collector.step(self.state["step"])

    def record(self, summary, sample_ids, progress) -> None:
        """Count the step, check it and the data, and show it: steps.jsonl, progress bar, trackers."""
        state = self.state
        state["step"] += 1
        state["tokens_seen"] += summary.tokens
        state["samples_seen"] += summary.samples
        state["losses"].append(summary.loss if summary.finite else float("nan"))
        self.skipped_examples = skip_counts(summary.skipped)
        record = summary.record(state["step"])
        if self.args.log_sample_ids:
            record["sample_ids"] = gather_object([sample_ids])
        self.step_log.append(record)
        self.count_bad_steps(summary)
        self.guard.check(summary.samples_seen, self.skipped_examples, self.pipeline.skip_examples)

        lr = self.scheduler.get_last_lr()[0]
        steady_rate = self.clock.recent_steady_rate()
        postfix = {"loss": f"{summary.loss:.3g}", "lr": f"{lr:.2g}",
                   "tok/s": "warm-up" if steady_rate is None else f"{steady_rate:.3g}"}
        mfu = self.clock.mfu(steady_rate)
        if mfu is not None:
            postfix["mfu"] = f"{mfu:.1%}"
        if self.eval_loss is not None:
            postfix["eval_loss"] = f"{self.eval_loss:.3g}"
        postfix["skipped"] = sum(self.skipped_examples.values())
        if state["skipped_steps"]:
            postfix["bad_steps"] = state["skipped_steps"]
        progress.set_postfix(postfix, refresh=False)
        progress.update(1)
        if self.args.report_to != "none" and state["step"] % self.args.log_every == 0:
            logs = {"loss": summary.loss, "lr": lr, **self.clock.last_step(),
                    "skipped_examples": sum(self.skipped_examples.values()), "skipped_steps": state["skipped_steps"],
                    **{f"skipped/{reason}": count for reason, count in self.skipped_examples.items()}}
            if summary.grad_norm is not None:
                logs["grad_norm"] = summary.grad_norm
            if self.accelerator.num_processes > 1:  # straggler_compute is the previous step's (see metrics)
                logs["straggler_work"] = finite_or_none(summary.straggler_work)
                logs["straggler_compute"] = finite_or_none(summary.straggler_compute)
            if steady_rate is not None:
                logs["tokens_per_s_steady"] = steady_rate
            self.accelerator.log({k: v for k, v in logs.items() if v is not None}, step=state["step"])

    def count_bad_steps(self, summary) -> None:
        if summary.finite:
            self.consecutive_bad = 0
            return
        self.state["skipped_steps"] += 1
        self.consecutive_bad += 1
        if self.consecutive_bad >= self.args.max_bad_steps:
            raise RuntimeError(f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                               f"(last at step {self.state['step']}); stopping. Lower the learning rate?")

    def skipped_by_reason(self) -> dict[str, int]:
        """Every rank's skip counts by reason, summed (a collective: every rank calls it)."""
        total: Counter[str] = Counter()
        for counts in gather_object([dict(self.pipeline.skipped)]):
            total.update(counts)
        return dict(total)
