"""A 2-process job for tests/test_distributed_checkpoints.py, launched with torchrun: a small model and optimizer
checkpointed with `save_checkpoint` while one rank writes slowly, hangs mid-save (the test kills it), or runs out of
disk. Each rank writes what it saw to `<output_dir>/report-<phase>-rank<R>.json`.

Phases:
    save      steps 1-3, a checkpoint each; the slow rank sleeps before writing its part, and at --hang_at_step it
              writes its pid to `<output_dir>/hanging.pid` and sleeps until killed.
    resume    resume from `latest`, then save step 3 again, then step 4 with the slow rank out of disk; with --vlm,
              rank 0 also exports the newest checkpoint and compares it with the gathered weights.
    per_node  one process per "node", each with its own disk (`<output_dir>/node<N>`), save_on_each_node: save
              steps 1-2, then node 1 loses its step-2 before the rename; both nodes must resume from step 1.

--backend picks accelerate's state layout: ddp (gloo on CPU, the CPU tests), or on 2 GPUs fsdp-sharded (DCP
folders), fsdp-full, deepspeed-zero2, deepspeed-zero3. --vlm trains a tiny Llama3Siglip2 instead of a Linear layer.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from worker_exit import leave_without_teardown  # this script's folder, tests/

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from train_lib.checkpoints import (
    PARTIAL_PREFIX,
    CheckpointDiskFullError,
    complete_checkpoints,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
)


def make_accelerator(backend: str, per_node: bool) -> Accelerator:
    config = ProjectConfiguration(save_on_each_node=per_node)
    if backend == "ddp":
        return Accelerator(cpu=not torch.cuda.is_available(), project_config=config)
    if backend.startswith("fsdp"):
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, state_dict_type="SHARDED_STATE_DICT" if backend == "fsdp-sharded" else "FULL_STATE_DICT",
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer", "Siglip2EncoderLayer"])
        return Accelerator(fsdp_plugin=plugin, project_config=config)
    from accelerate import DeepSpeedPlugin

    stage = int(backend[-1])
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1, zero3_save_16bit_model=stage == 3)
    accelerator = Accelerator(deepspeed_plugin=plugin, project_config=config)
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
    return accelerator


def build(vlm: bool, device):
    """(model, a function step -> loss inputs, the `hf/` objects for save_checkpoint)."""
    torch.manual_seed(0)
    if not vlm:
        return torch.nn.Linear(8, 4), lambda generator: {"input": torch.randn(4, 8, generator=generator)}, {}
    from train_lib.arguments import ModelArguments
    from train_lib.model_factory import build_scratch_model, scratch_tokenizer_corpus

    args = ModelArguments(text_hidden_size=32, text_intermediate_size=64, text_heads=2, text_kv_heads=1,
                          vision_hidden_size=16, vision_intermediate_size=32, vision_heads=2, max_patches=16)
    model, processor = build_scratch_model(args, scratch_tokenizer_corpus())

    def batch(generator):
        # Text only: the model still runs a blank image through the vision tower, so every parameter gets a gradient.
        words = ["red", "blue", "green", "box", "and", "a"]
        text = " ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=generator).tolist())
        inputs = processor.tokenizer([text, text[::-1]], padding=True, return_tensors="pt")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "labels": inputs["input_ids"]}

    return model, batch, {"model_config": model.config, "generation_config": model.generation_config,
                          "processor": processor}


def slow_down(accelerator, rank: int, seconds: float, hang_at_step: int | None, pid_file: str, steps: list[int],
              disk_full_at_step: int | None = None):
    """Wrap accelerate's writer of the per-process files (RNG states; with DDP also the model and optimizer) so that
    `rank` is slow, hangs, or finds the disk full while the others write."""
    import accelerate.accelerator

    original = accelerate.accelerator.save_accelerator_state

    def save_accelerator_state(*args, **kwargs):
        if accelerator.process_index == rank:
            if steps[-1] == hang_at_step:
                with open(pid_file, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)
            if steps[-1] == disk_full_at_step:
                raise OSError(errno.ENOSPC, "No space left on device")
            time.sleep(seconds)
        return original(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = save_accelerator_state


def tensors(value):
    """Every tensor in a nested state dict, as this process holds it (an FSDP2 DTensor: the local shard)."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)
    elif torch.is_tensor(value):
        yield value.to_local() if hasattr(value, "to_local") else value


def fingerprint(model, optimizer) -> dict:
    """Weights, optimizer state and this process's RNG states, hashed: equal only if restored bit for bit."""
    digest = hashlib.sha256()
    for tensor in [*tensors(model.state_dict()), *tensors(optimizer.state_dict())]:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    return {"weights_and_optimizer": digest.hexdigest(),
            "rng": hashlib.sha256(b"".join(state.numpy().tobytes() for state in rng)).hexdigest()}


def exported_weights_match(accelerator, model, output_dir) -> dict:
    """Rank 0 runs the export command on the newest checkpoint, in its own process as a user would (in this one,
    ZeRO-3 would partition the model `from_pretrained` builds); the exported weights must equal the gathered ones."""
    full = accelerator.get_state_dict(model)  # a collective: every rank
    if not accelerator.is_main_process:
        return {}
    from safetensors.torch import load_file

    folder = os.path.join(output_dir, "export")
    launcher_variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                          "MASTER_PORT", "TORCHELASTIC", "ACCELERATE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_variables)}
    command = [sys.executable, os.path.join(EXAMPLES, "export_checkpoint.py"), complete_checkpoints(output_dir)[-1],
               "--out", folder]
    subprocess.run(command, env=env, check=True)
    exported = load_file(os.path.join(folder, "model.safetensors"))  # a tied lm_head is stored once
    mismatched = [name for name, tensor in exported.items() if not torch.equal(tensor, full[name].cpu())]
    return {"exported_keys": len(exported), "mismatched": mismatched}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--phase", choices=["save", "resume", "per_node"], required=True)
    parser.add_argument("--backend", default="ddp",
                        choices=["ddp", "fsdp-sharded", "fsdp-full", "deepspeed-zero2", "deepspeed-zero3"])
    parser.add_argument("--vlm", action="store_true")
    parser.add_argument("--slow_rank", type=int, default=1)
    parser.add_argument("--slow_seconds", type=float, default=0.0)
    parser.add_argument("--hang_at_step", type=int, default=None)
    args = parser.parse_args()

    per_node = args.phase == "per_node"
    output_dir = os.path.join(args.output_dir, f"node{os.environ['GROUP_RANK']}") if per_node else args.output_dir
    accelerator = make_accelerator(args.backend, per_node)
    rank = accelerator.process_index
    model, make_batch, hf_files = build(args.vlm, accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    steps: list[int] = [0]
    slow_down(accelerator, args.slow_rank, args.slow_seconds, args.hang_at_step,
              os.path.join(args.output_dir, "hanging.pid"), steps,
              disk_full_at_step=4 if args.phase == "resume" else None)
    report: dict = {"rank": rank, "saved": {}}

    def train_and_save(step: int) -> None:
        batch = make_batch(torch.Generator().manual_seed(1000 * step + rank))  # each rank its own batch
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = model(**batch).loss if args.vlm else model(batch["input"]).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        steps.append(step)
        save_checkpoint(accelerator, output_dir, step, {"step": step}, keep=2, **hf_files)
        report["saved"][step] = fingerprint(model, optimizer)

    def write_report():
        with open(os.path.join(args.output_dir, f"report-{args.phase}-rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)

    if args.phase in ("save", "per_node"):
        for step in (1, 2) if per_node else (1, 2, 3):
            train_and_save(step)
            write_report()  # before the next save, which may be the one that hangs
    if per_node:
        report["own_files"] = sorted(os.listdir(os.path.join(output_dir, "checkpoints", "step-2")))
        if rank == 1:  # node 1 was killed before its rename: its step-2 is still partial
            root = os.path.join(output_dir, "checkpoints")
            os.rename(os.path.join(root, "step-2"), os.path.join(root, f"{PARTIAL_PREFIX}step-2"))
        accelerator.wait_for_everyone()
    if args.phase in ("resume", "per_node"):
        resume_from = resolve_resume("latest", output_dir, accelerator)
        accelerator.load_state(resume_from)
        report["resumed_from"] = resume_from
        report["resumed_step"] = load_trainer_state(resume_from)["step"]
        report["resumed"] = fingerprint(model, optimizer)
    if args.phase == "resume":
        train_and_save(3)
        if args.vlm:
            report["export"] = exported_weights_match(accelerator, model, output_dir)
        try:
            train_and_save(4)
        except CheckpointDiskFullError as error:
            report["disk_full_error"] = str(error)
        report["checkpoints_after"] = sorted(os.listdir(os.path.join(output_dir, "checkpoints")))
    write_report()
    # Every rank done with every collective before the process group goes.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # Everything the test reads is written and the process group is gone by now.
    leave_without_teardown()
