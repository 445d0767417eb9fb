"""The training script's settings: three dataclass sections, read from a YAML file and then the command line.

`--config examples/configs/NAME.yaml` gives the file's values; any field can then be overridden on the command line
(`--max_steps 50`). Both go through transformers' `HfArgumentParser`, so `--help` lists every field with its help.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser

# With no --config, the script runs the default job described by this file.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.yaml")


@dataclass
class ModelArguments:
    """Where the model comes from, and which parts of it train."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved Llama3Siglip2 folder or hub id."})
    text_model: str | None = field(default=None, metadata={"help": "Llama checkpoint (hub id or folder) to compose."})
    vision_model: str | None = field(default=None, metadata={"help": "SigLIP2 checkpoint (hub id or folder) to compose."})
    spatial_merge_size: int = field(default=1, metadata={"help": "k: each k×k patch block becomes one image token."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention backend for both towers."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype when loading (mixed precision is separate)."})
    min_patches: int = field(default=1, metadata={"help": "Smallest patch count per image."})
    max_patches: int | None = field(default=None, metadata={"help": "Patch budget per image (default: the encoder's)."})
    # From scratch (used when neither model_name_or_path nor text_model/vision_model is given).
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 384
    vision_hidden_size: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    patch_size: int = 8
    vocab_size: int = 320
    # What trains.
    train_parts: str = field(default="all", metadata={"help": "projector | projector+llm | all"})
    use_lora: bool = field(default=False, metadata={"help": "PEFT LoRA adapters on the language model."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names inside the language model."},
    )
    save_merged_lora: bool = field(default=False, metadata={"help": "Also save the model with adapters merged in."})
    gradient_checkpointing: bool = False


@dataclass
class DataArguments:
    """What the model learns from, and how batches are packed."""

    dataset: str = field(default="scenes", metadata={"help": "'scenes' (embedded), a hub name, or a local path."})
    data_format: str = field(default="auto", metadata={"help": "caption | interleaved | chat | auto (from columns)"})
    data_files: str | None = field(default=None, metadata={"help": "Files for a builder such as parquet or json."})
    dataset_config: str | None = field(default=None, metadata={"help": "Subset name for load_dataset."})
    split: str = "train"
    image_column: str | None = field(default=None, metadata={"help": "Caption format: the image column (e.g. jpg)."})
    text_column: str | None = field(default=None, metadata={"help": "Caption format: the text column (e.g. txt)."})
    messages_column: str | None = field(default=None, metadata={"help": "Chat format: messages or conversations."})
    image_root: str | None = field(default=None, metadata={"help": "Folder that relative image paths start from."})
    streaming: bool = False
    strict: bool = field(default=False, metadata={"help": "Raise on the first bad sample instead of skipping it."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed row."})
    rows_per_batch: int = field(default=4, metadata={"help": "Packed rows per micro-batch on each process."})
    max_images: int | None = field(default=None, metadata={"help": "Image budget per micro-batch."})
    num_workers: int = 0
    scenes_size: int = field(default=100_000, metadata={"help": "Length of the scenes train split."})
    eval_samples: int = field(default=200, metadata={"help": "Held-out scenes for the exact-match evaluation."})


@dataclass
class TrainArguments:
    """How the optimisation runs, where it writes, and how it resumes."""

    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/<run_name>."})
    run_name: str = "default"
    seed: int = 0
    max_steps: int = 400
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    adam_beta2: float = 0.98
    warmup_steps: int = 30
    lr_scheduler_type: str = "cosine"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, no on CPU) | no | bf16 | fp16"})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    max_bad_steps: int = field(default=5, metadata={"help": "Stop after this many consecutive non-finite steps."})
    inject_nan_steps: str = field(default="", metadata={"help": "Testing aid: comma-separated steps whose loss is NaN."})
    log_every: int = 10
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none"})
    eval_before: bool = True
    eval_max_new_tokens: int = 16
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push final/ to."})
    check_final_reload: bool = field(default=False, metadata={"help": "Reload final/ and compare its logits with "
                                                                       "the in-memory model's (report key)."})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the decoder and encoder layers "
                                                                  "(default: on GPU, off on CPU)."})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Chunked linear+cross-entropy over this many "
                                                                        "tokens, no fp32 logits (default: 2048 on GPU, "
                                                                        "0 = plain loss on CPU)."})
    decoder_attention: str | None = field(default=None, metadata={"help": "Attention for the decoder alone, e.g. "
                                                                          "flex_attention (default: flex on GPU, the "
                                                                          "model's on CPU)."})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.run_name)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """`--config FILE.yaml` (default: configs/default.yaml; `--config ""` for none) supplies values; flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    config_path = DEFAULT_CONFIG
    if "--config" in argv:
        at = argv.index("--config")
        config_path = argv[at + 1]
        del argv[at : at + 2]
    if config_path:
        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        known = {name for dtype in parser.dataclass_types for name in dtype.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown fields {unknown}")
        parser.set_defaults(**values)
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, train_args


def data_config(data_args: DataArguments, seed: int):
    """The data pipeline's own config (`processing.data.DataConfig`) from the script's data section."""
    from processing.data import DataConfig

    return DataConfig(
        dataset=data_args.dataset,
        data_files=data_args.data_files,
        dataset_config=data_args.dataset_config,
        split=data_args.split,
        streaming=data_args.streaming,
        format=data_args.data_format,
        image_column=data_args.image_column,
        text_column=data_args.text_column,
        messages_column=data_args.messages_column,
        image_root=data_args.image_root,
        scenes_size=data_args.scenes_size,
        seed=seed,
        rows_per_batch=data_args.rows_per_batch,
        max_images_per_batch=data_args.max_images,
        num_workers=data_args.num_workers,
        strict=data_args.strict,
    )
