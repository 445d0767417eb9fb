"""Train a Llama3Siglip2 vision-language model: `accelerate launch examples/train.py [--config FILE.yaml] [--field value]`.

With no arguments it trains a tiny model from scratch on the embedded `scenes` set (a CPU is enough), measures
caption exact match before and after, and with blank images, then saves `final/` and reloads it with the Auto
classes. The same script runs a real Llama 3 + SigLIP2 model on one GPU, DDP, FSDP2 or DeepSpeed ZeRO, chosen by
the accelerate config (`examples/accelerate/*.yaml`).

`main` reads as setup, loop, finish: `build_training` makes the model, data and optimizer and prepares them,
`start_or_resume` restores a checkpoint (also one saved on another number of processes, see `train_lib/resume`),
`train_lib.loop.Trainer` runs the steps, and `finish` saves `final/`, evaluates and writes `report.json`. Besides
`report.json`, the main process writes `steps.jsonl`: one line per step with the loss and a digest of the samples.

A testing aid outside the run's config and `--help` (`train_lib.loop.LoopOptions`): `--test_slow_save_rank R
--test_slow_save_seconds S` makes rank R write its part of each checkpoint S seconds late.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from train_lib.arguments import data_config, parse_arguments
from train_lib.checkpoints import resolve_resume
from train_lib.evaluation import Evaluator, caption_exact_match, final_reload_difference
from train_lib.hub import check_push_target, push_final
from train_lib.loop import Trainer, slow_down_checkpoint_writes, split_loop_options
from train_lib.model_card import write_model_card
from train_lib.model_factory import build_model_and_processor, parameter_count, parameter_counts, select_trainable
from train_lib.preemption import compile_workers_through_sigterm
from train_lib.reporting import describe_run, flops_per_token, peak_flops, save_final, write_report
from train_lib.resume import resume_from
from transformers import get_scheduler

from modeling_llama3_siglip2.efficient_ops import (
    compile_layers,
    use_decoder_attention,
    use_packed_vision,
    use_vision_attention,
)
from processing.data import SkipRateGuard, build_train_dataloader

# Left out of the summary printed at the end (report.json keeps them): one line per step or per sample.
LONG_REPORT_KEYS = ("loss_curve", "eval_examples", "eval_generations")


def main(argv=None):
    options, argv = split_loop_options(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, train_args = parse_arguments(argv)
    if train_args.push_to_hub:  # every process: a doomed push fails them all now, not after training
        check_push_target(train_args.push_to_hub, train_args.push_check_remote)
    accelerator = make_accelerator(train_args)
    set_seed(train_args.seed)

    model, processor, pipeline, optimizer, scheduler, counts = build_training(accelerator, model_args, data_args,
                                                                             train_args)
    evaluator = Evaluator(model_args, data_args, train_args, processor, accelerator)
    slow_down_checkpoint_writes(accelerator, options)
    state, resumed = start_or_resume(accelerator, pipeline, train_args)
    report = evaluator.initial_evaluation(state["step"], model, accelerator)
    announce(accelerator, model_args, data_args, train_args, counts, resumed)

    trainer = Trainer(accelerator, model, optimizer, scheduler, pipeline, processor, state, train_args, options,
                      counts.flops_per_token, peak_flops(accelerator.device),
                      guard=SkipRateGuard(max_skip_rate=data_args.max_skip_rate),
                      evaluate=lambda step: evaluator.maybe_evaluate(step, model, accelerator))
    start = time.time()
    if not trainer.train():  # stopped by SIGTERM, after a checkpoint
        accelerator.end_training()
        return None
    report.update(training_figures(trainer, time.time() - start, resumed))
    return finish(accelerator, trainer, evaluator, report, model, processor, model_args, data_args, train_args)


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
    if accelerator.gradient_accumulation_steps != train_args.gradient_accumulation_steps:
        # `accelerate launch --gradient_accumulation_steps` (or an accelerate config's deepspeed_config) reaches the
        # Accelerator through the environment and overrides its argument without a word.
        raise ValueError(
            f"The launcher sets gradient_accumulation_steps {accelerator.gradient_accumulation_steps} "
            f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS: `accelerate launch --gradient_accumulation_steps` or the "
            f"accelerate config's deepspeed_config), the run --gradient_accumulation_steps "
            f"{train_args.gradient_accumulation_steps}. Set it in one place.")
    if on_cpu:
        # `accelerate launch` pins CPU runs to one thread per process; share the cores among the processes instead.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // accelerator.num_processes))
    return accelerator


def use_fast_path(model, train_args, accelerator) -> None:
    """The fastest correct path measured in BENCHMARKS.md, by default on GPU: the chunked loss (no fp32 logits),
    flex attention for the packed decoder rows (no dense 4-D mask), and compiled layers; with `--pack_vision`,
    packed images in the vision tower (no padding patches), else the vision mask built without a host read. Each computes the same
    function as the plain path (tests/test_efficient_ops.py). Flex has no CPU backward, so CPU keeps sdpa.

    ZeRO-3 keeps the whole fast path. The chunked loss runs inside `lm_head`'s own call (`Llama3Siglip2LMHead`), where
    ZeRO-3 gathers the whole weight. The layers are DeepSpeed leaf modules (`prepare_for_zero3`) and compile their
    `forward` only, with DeepSpeed's hooks eager around them: traced, the hooks broke every layer's graph until
    Inductor met a size it could not lower flex attention with (BENCHMARKS.md). A DeepSpeed config that asks for
    DeepSpeed's own `F.linear` (`memory_efficient_linear: true`) keeps the layers eager, as compiled they would
    recompile for every layer."""
    on_gpu = accelerator.device.type == "cuda"
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    chunk = train_args.loss_chunk_size
    model.config.loss_chunk_size = (2048 if on_gpu else 0) if chunk is None else chunk
    decoder_attention = train_args.decoder_attention or ("flex_attention" if on_gpu else None)
    if decoder_attention:
        use_decoder_attention(model, decoder_attention)
    pack_vision = train_args.pack_vision
    if pack_vision:
        use_packed_vision(model)
    elif on_gpu and model.model.vision_tower.config._attn_implementation == "sdpa":
        use_vision_attention(model)  # padded images: sdpa's mask, built without reading it back (a host sync)
    deepspeed_linear = zero3 and plugin.deepspeed_config.get("zero_optimization", {}).get("memory_efficient_linear")
    if train_args.compile if train_args.compile is not None else (on_gpu and not deepspeed_linear):
        # Packed images have one length a batch, from a bounded set: static shapes for flex attention's kernels.
        compile_layers(model, vision_shapes="static" if pack_vision else "dynamic", trace_hooks=not zero3)
    if on_gpu or train_args.compile:  # flex attention and compiled layers compile at any step a new shape comes
        compile_workers_through_sigterm()  # a scheduler's SIGTERM to the group must not kill them (preemption.py)


def prepare_for_zero3(model, deepspeed_config: dict) -> int:
    """Before DeepSpeed ZeRO-3 wraps the model: make each Llama decoder layer and SigLIP2 encoder layer one unit for
    ZeRO-3 (DeepSpeed's leaf modules), keep torch's own `F.linear` unless the config asks for DeepSpeed's, and fill
    in the bucket sizes and persistence threshold. Returns how many layers became leaves.

    A leaf layer's weights are gathered together when the layer is called, by one pair of hooks, instead of by hooks
    on each of its ~10 submodules. Those hooks were the step's cost: on 2 H100s they kept the host busy ~850 ms a step
    around ~200 ms of computation, and on 4 H100s leaf layers took the step from 0.65 s to 0.36 s (BENCHMARKS.md).
    DeepSpeed's `memory_efficient_linear` (on by default) swaps `F.linear` for an autograd Function whose backward
    reads each weight's `ds_id`; compiled, each layer then recompiled on a guard on that id, until dynamo gave up.
    Either way DeepSpeed gathers the layer's weights before its backward. Both compute the same
    (tests/test_zero3_leaf_layers.py).

    Sizes the config leaves out or "auto" follow the layers, and measured faster than DeepSpeed's defaults and
    transformers' Trainer's "auto" sizes (BENCHMARKS.md): gradients are reduce-scattered and weights prefetched two
    layers at a time (DeepSpeed's 5e7-element prefetch bucket is less than one 1B-class decoder layer). Weights no
    larger than the vision encoder's largest stay whole on every rank (DeepSpeed's persistent parameters): the
    encoder, which then needs no gathering, and the decoder's key and value projections, for 0.25 GB a rank
    (1B-class config; 1.4 GB for the 8B-class one); this removes gathers, but no speed-up is claimed for it. Gradients
    go straight to the reduce-scatter (`contiguous_gradients` false unless the config sets it or all-reduces)."""
    from deepspeed.utils import set_z3_leaf_modules
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.siglip2.modeling_siglip2 import Siglip2EncoderLayer

    zero = deepspeed_config.setdefault("zero_optimization", {})
    if zero.get("stage3_module_granularity_threshold"):
        raise ValueError(
            "zero_optimization.stage3_module_granularity_threshold: DeepSpeed's fast fetching of leaf modules trained "
            "this model wrongly (DeepSpeed 0.19.8, 2 H100s: its loss left ZeRO-3's at step 3, and was 1.77 against "
            "1.26 after 60 steps). Leave it unset: train.py already makes each layer one ZeRO-3 unit.")
    zero.setdefault("memory_efficient_linear", False)
    # Reduce-scattering gradients (DeepSpeed's default) concatenates them into a fresh buffer anyway, so the
    # contiguous bucket they were first copied into is a second full copy; only an all-reduce reads that bucket.
    zero.setdefault("contiguous_gradients", zero.get("reduce_scatter", True) is False)
    layers = set_z3_leaf_modules(model, [LlamaDecoderLayer, Siglip2EncoderLayer])
    two_layers = 2 * max(sum(parameter_count(p) for p in layer.parameters()) for layer in layers)
    largest_vision_weight = max((parameter_count(p) for layer in layers if isinstance(layer, Siglip2EncoderLayer)
                                 for p in layer.parameters()), default=0)
    sizes = {"reduce_bucket_size": two_layers, "stage3_prefetch_bucket_size": two_layers,
             "stage3_param_persistence_threshold": largest_vision_weight}
    for key, size in sizes.items():
        # "auto" too (Hugging Face's ZeRO-3 template): accelerate would size it from `config.hidden_size`, which the
        # composite config lacks, and refuse the config.
        if zero.get(key, "auto") == "auto":
            zero[key] = size
    return len(layers)


@dataclass
class ModelCounts:
    """Counted before `accelerate.prepare`, which partitions the parameters (ZeRO-3, FSDP2); ZeRO-3's `zero.Init`
    partitions them even earlier, which `parameter_count` sees through (`ds_numel`)."""

    total_params: int
    trainable_params: int
    flops_per_token: float


def refuse_deepcompile(deepspeed_config: dict) -> None:
    """DeepSpeed's DeepCompile (`"compile": {"deepcompile": true}`) acts only once `engine.compile()` runs. train.py
    does not call it (it compiles each layer itself, DeepSpeed's hooks eager), and accelerate calls it only with a
    dynamo backend, which its DeepSpeed launcher drops from an accelerate config: the run would train without
    DeepCompile, unannounced. With `ACCELERATE_DYNAMO_BACKEND` set, accelerate does compile the model whole with it,
    and on 2 H200s that run failed in its first step (BENCHMARKS.md, eleventh session). DeepCompile also hangs when
    input sizes differ between ranks or steps (DeepSpeed issue #7611, open): it profiles each new graph with
    collectives, and native-resolution images recompile at different steps on different ranks. Refused until both
    are solved."""
    if (deepspeed_config.get("compile") or {}).get("deepcompile"):
        raise ValueError(
            "compile.deepcompile: train.py does not support DeepSpeed's DeepCompile: it compiles each layer itself, "
            "while DeepCompile needs the whole model compiled by engine.compile(), which nothing here calls. Compiled "
            "whole, this model failed in DeepCompile's first step (BENCHMARKS.md), and DeepCompile hangs when image "
            "sizes differ between ranks or steps (DeepSpeed issue #7611), as they do here. Remove it from the "
            "DeepSpeed config.")


def match_deepspeed_to_run(deepspeed_config: dict, data_args, train_args) -> None:
    """DeepSpeed's batch and clipping from the run: its micro-batch is our packed rows (we feed DeepSpeed our own
    batches, not a DataLoader it could size), and its accumulation and clipping are the run's
    `--gradient_accumulation_steps` and `--max_grad_norm` where the DeepSpeed config leaves them out or "auto".

    A value set in both that disagrees is refused: accelerate would keep DeepSpeed's with a log line, and the run
    would train another batch size (the 1B config's 4 micro-batches became 1 under an accelerate config that set 1)
    or clip at another norm than it says."""
    deepspeed_config["train_micro_batch_size_per_gpu"] = data_args.rows_per_batch
    run_values = {"gradient_accumulation_steps": (train_args.gradient_accumulation_steps, "--gradient_accumulation_steps"),
                  "gradient_clipping": (train_args.max_grad_norm, "--max_grad_norm")}
    for key, (ours, flag) in run_values.items():
        theirs = deepspeed_config.get(key, "auto")
        if theirs == "auto":
            deepspeed_config[key] = ours
        elif float(theirs) != float(ours):
            raise ValueError(
                f"The DeepSpeed config sets {key} {theirs}, the run {flag} {ours}. Set it in one place: leave it out "
                f"of the DeepSpeed config (or the accelerate config's deepspeed_config) to follow the run, or pass "
                f"{flag} {theirs}.")


def build_training(accelerator, model_args, data_args, train_args):
    """The model, its processor, this rank's data, the optimizer and scheduler, prepared by accelerate; and the
    model's `ModelCounts`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # before minutes of loading weights
        refuse_deepcompile(plugin.deepspeed_config)
        match_deepspeed_to_run(plugin.deepspeed_config, data_args, train_args)
    model, processor = build_model_and_processor(model_args)
    use_fast_path(model, train_args, accelerator)
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = select_trainable(model, model_args)
    counts = ModelCounts(*parameter_counts(model), flops_per_token(model, data_args.seq_len))
    on_gpu = accelerator.device.type == "cuda"  # pinned batches: on one H100 pageable ones idled it 35-60 ms a step
    pipeline = build_train_dataloader(replace(data_config(data_args, train_args.seed), pin_memory=on_gpu), processor,
                                      data_args.seq_len, rank=accelerator.process_index,
                                      world_size=accelerator.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(0.9, train_args.adam_beta2),
                                  # fused: one kernel a step, and a non-finite step skipped on the device (loop.py)
                                  fused=accelerator.device.type in ("cuda", "cpu"))
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.warmup_steps,
                              num_training_steps=train_args.max_steps)
    if plugin is not None and plugin.zero_stage == 3:
        prepare_for_zero3(model, plugin.deepspeed_config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, processor, pipeline, optimizer, scheduler, counts


def start_or_resume(accelerator, pipeline, train_args) -> tuple[dict, str | None]:
    """A fresh run's counters, or those of the checkpoint `--resume_from_checkpoint` names, restored with it."""
    checkpoint = resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir, accelerator)
    if checkpoint is None:
        return {"step": 0, "samples_seen": 0, "tokens_seen": 0, "skipped_steps": 0, "losses": []}, None
    return resume_from(accelerator, checkpoint, pipeline, train_args.seed), checkpoint


def announce(accelerator, model_args, data_args, train_args, counts: ModelCounts, resumed) -> None:
    """The start-up summary (main process) and the trackers."""
    if accelerator.is_main_process:
        print(describe_run(model_args, data_args, train_args, accelerator, counts.total_params,
                           counts.trainable_params, resumed), flush=True)
    if train_args.report_to != "none":
        accelerator.init_trackers(train_args.run_name,
                                  config={**vars(model_args), **vars(data_args), **vars(train_args)})


def training_figures(trainer, wall: float, resumed) -> dict:
    """report.json's account of the training itself: counts, losses, speed, skips (a collective: all ranks)."""
    state = trainer.state
    steps_run = len(trainer.clock.seconds)
    finite = [x for x in state["losses"] if not math.isnan(x)]
    return {
        "steps": state["step"],
        "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"],
        "wall_seconds": wall,
        # Everything this process trained, over its wall time: compilation, warm-up and evaluations included.
        "tokens_per_second_wall": sum(trainer.clock.tokens) / wall if steps_run else 0.0,
        **trainer.clock.summary(),
        "host_syncs_per_step": trainer.host_syncs_per_step(),
        "peak_memory_gib": peak_memory_gib(trainer.accelerator),
        "resumed_from": resumed,
        "train_loss_first": finite[0] if finite else None,
        "train_loss_last": finite[-1] if finite else None,
        "loss_curve": state["losses"],
        "skipped_steps": state["skipped_steps"],
        "skipped": trainer.skipped_by_reason(),
    }


def peak_memory_gib(accelerator) -> float | None:
    """The most GPU memory any rank had allocated at once (a collective: all ranks); None on CPU."""
    if accelerator.device.type != "cuda":
        return None
    return max(gather_object([torch.cuda.max_memory_allocated(accelerator.device) / 2**30]))


def finish(accelerator, trainer, evaluator, report, model, processor, model_args, data_args, train_args) -> dict:
    """Save `final/`, evaluate, write report.json and the model card, reload `final/` to prove it stands alone,
    and push it last: a failed upload loses nothing."""
    final_dir = save_final(accelerator, model, processor, model_args, train_args)
    if train_args.check_final_reload and not model_args.use_lora:
        probe = next(trainer.batches)
        report["final_reload_max_abs_diff"] = final_reload_difference(accelerator, model, final_dir, probe)
    report.update(evaluator.final_evaluation(trainer.state["step"], model, accelerator))
    if accelerator.is_main_process:
        write_report(train_args.output_dir, report)
        write_model_card(final_dir, model_args, data_args, train_args, report)
        print(json.dumps({k: v for k, v in report.items() if k not in LONG_REPORT_KEYS}, indent=1), flush=True)
        if evaluator.scenes and not model_args.use_lora:
            reload_and_caption(final_dir, evaluator.scenes[0])
        if train_args.push_to_hub:
            report["push"] = push_final(train_args.output_dir, train_args.push_to_hub)
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
