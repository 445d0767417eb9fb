"""What the user sees and keeps: the start-up summary, the MFU estimate, `final/` and `report.json`.

`final/` holds the gathered full weights and the processor, or for LoRA the adapter; when the adapter's base exists
nowhere else (a model from scratch or composed at start-up: new projector, new token rows), `final/base/` holds it
and the adapter config points there. Publishing (model card, push) is `model_card` and `hub`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from .model_factory import parameter_count

LORA_BASE_FOLDER = "base"
# Keys of a peft model's state dict that belong to the adapter, not to the base model.
ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.")

# Dense bf16 matrix-unit peaks (FLOP/s) for the MFU estimate in the progress bar; benchmarks/bench_train.py
# measures the real ceiling instead.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@dataclass(frozen=True)
class FlopModel:
    """The training FLOPs the MFU counts: 6 per token for each parameter that multiplies it (forward + backward),
    plus attention's score and value products, 12·layers·hidden for each (query token, token it attends over).

    N (`matmul_params`) counts every parameter that multiplies a token, embedding lookups excluded, vision tower
    included: an image enters as its image tokens in the decoder rows (one per `spatial_merge_size`² patches), so
    its patches count through them (the vision tower's own cost per patch is not modelled apart). One formula, two uses: `flops_per_token` (the MFU) lets every token attend over the whole row,
    and the trainer's per-rank work gives it the packed samples' own lengths (`loop.attention_pairs`).
    """

    matmul_params: int
    attention_flops_per_pair: int

    @classmethod
    def of(cls, model) -> FlopModel:
        config = model.config
        text = config.text_config
        matmul_params = sum(parameter_count(p) for n, p in model.named_parameters() if "embed_tokens" not in n)
        if getattr(config, "tie_word_embeddings", False):
            matmul_params += text.vocab_size * text.hidden_size  # the tied lm_head still multiplies every token
        return cls(matmul_params, 12 * text.num_hidden_layers * text.hidden_size)

    def flops(self, tokens: int, attended: int) -> float:
        """FLOPs of training on `tokens` tokens that attend over `attended` (query, key) pairs in all."""
        return 6 * self.matmul_params * tokens + self.attention_flops_per_pair * attended


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (`FlopModel`), each token attending over `seq_len`: packed rows attend over their
    own samples only, so this is an upper bound there."""
    return FlopModel.of(model).flops(tokens=1, attended=seq_len)


def backend_name(accelerator) -> str:
    """The parallelism in words: single process, DDP, FSDP2, DeepSpeed ZeRO-3, ..."""
    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return "single process"
    if kind == DistributedType.FSDP:
        return "FSDP2" if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2 else "FSDP"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind.value.startswith("MULTI_"):
        return "DDP"
    return kind.value


def describe_run(model_args, data_args, train_args, accelerator, total_params, trainable_params, resume_from) -> str:
    if model_args.model_name_or_path:
        source = model_args.model_name_or_path
    elif model_args.text_model:
        source = f"{model_args.text_model} + {model_args.vision_model}"
    else:
        source = "tiny model from scratch"
    backend = backend_name(accelerator)
    if accelerator.num_processes > 1:
        backend += f" ({accelerator.distributed_type.value} on {accelerator.num_processes} processes)"
    trains = "LoRA adapters + projector" if model_args.use_lora else model_args.train_parts
    lines = [
        f"model     {source}: {total_params / 1e6:.1f} M parameters, {trainable_params / 1e6:.2f} M trainable ({trains})",
        (f"data      {data_args.dataset} ({data_args.data_format}), rows of {data_args.seq_len} tokens, "
         f"{data_args.rows_per_batch} rows × {train_args.gradient_accumulation_steps} micro-batches per process"),
        f"setup     {backend}, device {accelerator.device}, mixed precision {accelerator.mixed_precision}",
        f"run       {train_args.max_steps} steps, lr {train_args.learning_rate} ({train_args.lr_scheduler_type}, "
        f"{train_args.warmup_steps} warm-up), output {train_args.output_dir}"
        + (f", resuming from {resume_from}" if resume_from else ""),
        f"config    {train_args.config or 'none (defaults for a named model)'}",
    ]
    return "\n".join(lines)


def save_final(accelerator, model, processor, model_args, train_args) -> str:
    """Gather the full weights (FSDP, ZeRO-3) and save a Hub-ready `final/`; LoRA saves the adapter there.

    Nothing is pushed here: `hub.push_final` runs once report.json and the model card are written.
    """
    final_dir = os.path.join(train_args.output_dir, "final")
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    save_kwargs = {"is_main_process": accelerator.is_main_process, "save_function": accelerator.save}
    unwrapped.save_pretrained(final_dir, state_dict=state_dict, **save_kwargs)
    if accelerator.is_main_process:
        processor.save_pretrained(final_dir)
        if model_args.use_lora and not model_args.model_name_or_path:
            save_lora_base(unwrapped, processor, state_dict, final_dir)
        if model_args.use_lora and model_args.save_merged_lora:
            unwrapped.merge_and_unload().save_pretrained(os.path.join(final_dir, "merged"))
            processor.save_pretrained(os.path.join(final_dir, "merged"))
    accelerator.wait_for_everyone()
    return final_dir


def save_lora_base(peft_model, processor, peft_state_dict: dict, final_dir: str) -> str:
    """Save the adapter's base model to `final/base/` and point `adapter_config.json` at it (a relative path).

    The base is the state dict without the adapter's tensors: LoRA's `base_layer` weights under their plain names,
    and the untrained `original_module` of each module the adapter saves whole (the projector).
    """
    base_dir = os.path.join(final_dir, LORA_BASE_FOLDER)
    base_state = {}
    for key, tensor in peft_state_dict.items():
        if ADAPTER_KEY.search(key):
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        base_state[key] = tensor
    peft_model.get_base_model().save_pretrained(base_dir, state_dict=base_state)
    processor.save_pretrained(base_dir)
    adapter_config = os.path.join(final_dir, "adapter_config.json")
    with open(adapter_config) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = LORA_BASE_FOLDER
    with open(adapter_config, "w") as f:
        json.dump(config, f, indent=2)
    return base_dir


def write_report(output_dir: str, report: dict) -> None:
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
