"""What the user sees and keeps: the start-up summary, the MFU estimate, `final/` and `report.json`."""

from __future__ import annotations

import json
import os

import torch

# Dense bf16 matrix-unit peaks (FLOP/s) for the MFU estimate in the progress bar; benchmarks/bench_train.py
# measures the real ceiling instead.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matrix products (forward + backward), plus attention's 12·layers·S·d.

    N counts every parameter that multiplies a token (embedding lookups excluded). The attention term assumes rows
    attend over `seq_len`; packed rows attend over their own samples only, so this is an upper bound there.
    """
    config = model.config
    text = config.text_config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if getattr(config, "tie_word_embeddings", False):
        matmul_params += text.vocab_size * text.hidden_size  # the tied lm_head still multiplies every token
    attention = 12 * text.num_hidden_layers * seq_len * text.hidden_size
    return 6 * matmul_params + attention


def describe_run(model_args, data_args, train_args, accelerator, total_params, trainable_params, resume_from) -> str:
    if model_args.model_name_or_path:
        source = model_args.model_name_or_path
    elif model_args.text_model:
        source = f"{model_args.text_model} + {model_args.vision_model}"
    else:
        source = "tiny model from scratch"
    distributed = accelerator.distributed_type.value if hasattr(accelerator.distributed_type, "value") else str(
        accelerator.distributed_type)
    trains = "LoRA adapters + projector" if model_args.use_lora else model_args.train_parts
    lines = [
        f"model     {source}: {total_params / 1e6:.1f} M parameters, {trainable_params / 1e6:.2f} M trainable ({trains})",
        f"data      {data_args.dataset} ({data_args.data_format}), rows of {data_args.seq_len} tokens, "
        f"{data_args.rows_per_batch} rows × {train_args.gradient_accumulation_steps} micro-batches per process",
        f"setup     {distributed} on {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}",
        f"run       {train_args.max_steps} steps, lr {train_args.learning_rate} ({train_args.lr_scheduler_type}, "
        f"{train_args.warmup_steps} warm-up), output {train_args.output_dir}"
        + (f", resuming from {resume_from}" if resume_from else ""),
    ]
    return "\n".join(lines)


def save_final(accelerator, model, processor, model_args, train_args) -> str:
    """Gather the full weights (FSDP, ZeRO-3) and save a Hub-ready `final/`; LoRA saves the adapter there."""
    final_dir = os.path.join(train_args.output_dir, "final")
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    save_kwargs = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if model_args.use_lora:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, **save_kwargs)
        if model_args.save_merged_lora and accelerator.is_main_process:
            unwrapped.merge_and_unload().save_pretrained(os.path.join(final_dir, "merged"))
            processor.save_pretrained(os.path.join(final_dir, "merged"))
    else:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, **save_kwargs)
    if accelerator.is_main_process:
        processor.save_pretrained(final_dir)
        if train_args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(train_args.push_to_hub, exist_ok=True)
            upload_folder(repo_id=train_args.push_to_hub, folder_path=final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def write_report(output_dir: str, report: dict) -> None:
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
