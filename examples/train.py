"""Train a Llama3Siglip2 vision-language model: `accelerate launch examples/train.py [--config FILE.yaml] [--field value]`.

With no arguments it trains a tiny model from scratch on the embedded `scenes` set (a CPU is enough), measures
caption exact match before and after, and with blank images, then saves `final/` and reloads it with the Auto
classes. The same script runs a real Llama 3 + SigLIP2 model on one GPU, DDP, FSDP2 or DeepSpeed ZeRO, chosen by
the accelerate config (`examples/accelerate/*.yaml`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from train_lib.arguments import data_config, parse_arguments
from train_lib.checkpoints import load_trainer_state, resolve_resume, save_checkpoint
from train_lib.evaluation import caption_exact_match, final_reload_difference
from train_lib.model_factory import build_model_and_processor, parameter_counts, select_trainable
from train_lib.reporting import describe_run, flops_per_token, peak_flops, save_final, write_report
from transformers import get_scheduler

from modeling_llama3_siglip2.efficient_ops import compile_layers, use_decoder_attention
from processing.data import build_train_dataloader
from processing.scenes import scenes_eval_examples


class StopRequested:
    """SIGTERM (a scheduler's pre-emption) asks for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def make_accelerator(train_args) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    mixed_precision = train_args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "no" if on_cpu else "bf16"
    trackers = None if train_args.report_to == "none" else train_args.report_to
    # cpu=True matters under torchrun on a machine without GPUs: without it, each process trains alone.
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        # One scheduler step per optimizer step: our steps already count the global batch of all processes.
        step_scheduler_with_optimizer=False,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=train_args.output_dir,
                                            logging_dir=os.path.join(train_args.output_dir, "logs")),
    )
    if on_cpu:
        # `accelerate launch` pins CPU runs to one thread per process; share the cores among the processes instead.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // accelerator.num_processes))
    return accelerator


def use_fast_path(model, train_args, accelerator) -> None:
    """The fastest correct path measured in BENCHMARKS.md, by default on GPU: the chunked loss (no fp32 logits),
    flex attention for the packed decoder rows (no dense 4-D mask), and compiled layers. Each computes the same
    function as the plain path (tests/test_efficient_ops.py). Flex has no CPU backward, so CPU keeps sdpa. ZeRO-3
    keeps the plain loss and eager layers: the chunked loss reads `lm_head.weight` outside the module call that
    gathers it, and Inductor fails on ZeRO-3's parameter hooks."""
    on_gpu = accelerator.device.type == "cuda"
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    chunk = train_args.loss_chunk_size
    if chunk is None:
        chunk = 2048 if on_gpu and not zero3 else 0
    elif chunk and zero3:
        raise ValueError("--loss_chunk_size needs lm_head's whole weight, which ZeRO-3 keeps partitioned; use 0")
    model.config.loss_chunk_size = chunk
    decoder_attention = train_args.decoder_attention or ("flex_attention" if on_gpu else None)
    if decoder_attention:
        use_decoder_attention(model, decoder_attention)
    if train_args.compile if train_args.compile is not None else (on_gpu and not zero3):
        compile_layers(model)


def batch_counts(micro_batches, processor) -> torch.Tensor:
    """[real (non-pad) tokens, samples] in these packed micro-batches; a sample starts where its position is 0."""
    pad = processor.pad_token_id
    real = [b["input_ids"] != pad for b in micro_batches]
    tokens = sum(int(r.sum()) for r in real)
    samples = sum(int(((b["position_ids"] == 0) & r).sum()) for b, r in zip(micro_batches, real))
    return torch.tensor([tokens, samples])


def count_targets(batch) -> torch.Tensor:
    """Label positions the shifted loss scores: every label but each row's first that is not ignored."""
    return (batch["labels"][:, 1:] != -100).sum()


def main(argv=None):
    model_args, data_args, train_args = parse_arguments(argv)
    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)
    torch.manual_seed(train_args.seed)

    model, processor = build_model_and_processor(model_args)
    use_fast_path(model, train_args, accelerator)
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = select_trainable(model, model_args)
    total_params, trainable_params = parameter_counts(model)

    pipeline = build_train_dataloader(data_config(data_args, train_args.seed), processor, data_args.seq_len,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(0.9, train_args.adam_beta2), fused=accelerator.device.type == "cuda")
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.warmup_steps,
                              num_training_steps=train_args.max_steps)
    if accelerator.state.deepspeed_plugin is not None:
        # We feed DeepSpeed our own packed batches, not a prepared DataLoader it could read the size from.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = data_args.rows_per_batch
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swapped them for sharded DTensors
    # DeepSpeed's own config wins over --gradient_accumulation_steps; use whichever accelerate settled on.
    accumulation = accelerator.gradient_accumulation_steps

    state = {"step": 0, "samples_seen": 0, "tokens_seen": 0, "skipped_steps": 0, "losses": [], "data": None}
    resume_from = resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    if resume_from:
        accelerator.load_state(resume_from)
        state = load_trainer_state(resume_from)
        data_states = state["data"]
        if len(data_states) != accelerator.num_processes:
            raise ValueError(f"{resume_from} was written by {len(data_states)} processes, this run has "
                             f"{accelerator.num_processes}: resume with the same world size")
        pipeline.load_state_dict(data_states[accelerator.process_index])

    is_scenes = data_args.dataset == "scenes"
    eval_examples = scenes_eval_examples(data_args.eval_samples, seed=train_args.seed) if is_scenes else []
    report = {}
    if eval_examples and train_args.eval_before and state["step"] == 0:
        report["eval_exact_match_before"], _ = caption_exact_match(accelerator.unwrap_model(model), processor,
                                                                   eval_examples, max_new_tokens=train_args.eval_max_new_tokens)

    if accelerator.is_main_process:
        print(describe_run(model_args, data_args, train_args, accelerator, total_params, trainable_params, resume_from),
              flush=True)
    if train_args.report_to != "none":
        accelerator.init_trackers(train_args.run_name,
                                  config={**vars(model_args), **vars(data_args), **vars(train_args)})

    stop = StopRequested()
    nan_steps = {int(s) for s in train_args.inject_nan_steps.split(",") if s.strip()}
    flops_token = flops_per_token(accelerator.unwrap_model(model), data_args.seq_len)
    peak = (peak_flops(accelerator.device) or 0.0) * accelerator.num_processes
    consecutive_bad, start_time, step_start = 0, time.time(), state["step"]
    data_iter = iter(pipeline)
    progress = tqdm(total=train_args.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    model.train()
    while state["step"] < train_args.max_steps:
        tick = time.time()
        micro_batches = [next(data_iter) for _ in range(accumulation)]
        targets = accelerator.reduce(sum(count_targets(b) for b in micro_batches).to(accelerator.device), "sum")
        step_loss, bad = torch.zeros((), device=accelerator.device), False
        for batch in micro_batches:
            with accelerator.accumulate(model):
                loss = model(**batch.to(accelerator.device), num_items_in_batch=targets).loss
                if state["step"] + 1 in nan_steps:
                    loss = loss * float("nan")
                finite = accelerator.reduce(torch.isfinite(loss).float(), "min")
                if finite.item() == 0:
                    bad = True  # no backward: a NaN would poison every gradient it reaches
                    continue
                step_loss += loss.detach()
                # accelerate averages gradients over processes and divides by the accumulation steps;
                # the loss is already a sum over all of them divided by their target count, so undo both.
                accelerator.backward(loss * accelerator.num_processes * accumulation)
        grad_norm = None
        if not bad:
            grad_norm = accelerator.clip_grad_norm_(trainable, train_args.max_grad_norm)
            bad = grad_norm is not None and not math.isfinite(float(grad_norm))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] += 1
            consecutive_bad += 1
            if consecutive_bad >= train_args.max_bad_steps:
                raise RuntimeError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                                   f"(last at step {state['step'] + 1}); stopping. Lower the learning rate?")
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            consecutive_bad = 0

        tokens, samples = accelerator.reduce(batch_counts(micro_batches, processor).to(accelerator.device), "sum").tolist()
        state["step"] += 1
        state["tokens_seen"] += tokens
        state["samples_seen"] += samples
        loss_value = float(accelerator.reduce(step_loss, "sum")) if not bad else float("nan")
        state["losses"].append(loss_value)
        elapsed = time.time() - tick
        logs = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": float(tokens) / elapsed}
        if peak:
            logs["mfu"] = flops_token * float(tokens) / elapsed / peak
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k != "grad_norm"})
        if train_args.report_to != "none" and state["step"] % train_args.log_every == 0:
            accelerator.log(logs, step=state["step"])

        at_checkpoint = train_args.checkpoint_every and state["step"] % train_args.checkpoint_every == 0
        if at_checkpoint or stop.requested:
            state["data"] = gather_object([pipeline.state_dict()])
            save_checkpoint(accelerator, train_args.output_dir, state["step"], state, train_args.keep_checkpoints)
            if stop.requested:
                accelerator.print(f"SIGTERM: saved step {state['step']} and stopping; resume with "
                                  f"--resume_from_checkpoint latest")
                accelerator.end_training()
                return None
    progress.close()

    skipped = Counter(pipeline.skipped)
    wall = time.time() - start_time
    report.update(
        steps=state["step"],
        samples_seen=state["samples_seen"],
        tokens_seen=state["tokens_seen"],
        wall_seconds=wall,
        tokens_per_second=(state["tokens_seen"] / wall) if state["step"] > step_start else 0.0,
        train_loss_first=next((x for x in state["losses"] if math.isfinite(x)), None),
        train_loss_last=next((x for x in reversed(state["losses"]) if math.isfinite(x)), None),
        loss_curve=state["losses"],
        skipped_steps=state["skipped_steps"],
        skipped=dict(skipped),
        eval_exact_match=None,
        eval_exact_match_blank_images=None,
    )
    final_dir = save_final(accelerator, model, processor, model_args, train_args)
    if train_args.check_final_reload and not model_args.use_lora:
        probe = next(data_iter)
        report["final_reload_max_abs_diff"] = final_reload_difference(accelerator, model, final_dir, probe)
    if eval_examples:
        unwrapped = accelerator.unwrap_model(model)
        report["eval_exact_match"], predictions = caption_exact_match(
            unwrapped, processor, eval_examples, max_new_tokens=train_args.eval_max_new_tokens)
        report["eval_exact_match_blank_images"], _ = caption_exact_match(
            unwrapped, processor, eval_examples, max_new_tokens=train_args.eval_max_new_tokens, blank_images=True)
        report["eval_examples"] = [{"caption": c, "prediction": p} for (_, c), p in zip(eval_examples[:5], predictions)]
    if accelerator.is_main_process:
        write_report(train_args.output_dir, report)
        print(json.dumps({k: v for k, v in report.items() if k != "eval_examples"}, indent=1), flush=True)
        if eval_examples and not model_args.use_lora:
            reload_and_caption(final_dir, eval_examples[0])
    accelerator.end_training()
    return report


def reload_and_caption(final_dir, example):
    """Prove `final/` stands alone: load it with the Auto classes and caption one held-out scene."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
    processor = AutoProcessor.from_pretrained(final_dir)
    _, predictions = caption_exact_match(model, processor, [example])
    print(f"reloaded {final_dir}: caption {predictions[0]!r} (expected {example[1]!r})", flush=True)


if __name__ == "__main__":
    main()
