"""The training script's settings: three dataclass sections, read from a YAML file and then the command line.

Which YAML file supplies the values before the command line overrides them:

    --config FILE.yaml       that file ("" for none);
    no --config, no model    configs/default.yaml: the toy job (a tiny model from scratch learns the scenes set);
    no --config, a model     none: a run that names its model (`--model_name_or_path`, or `--text_model` and
                             `--vision_model`) starts from the defaults below, which are meant for real models.

Defaults that depend on the run are left as None here and settled by `resolve_run_defaults`: the learning rate
(`default_learning_rate`: 2e-5 for a full fine-tune, 2e-4 with LoRA, 1e-3 for the projector alone, 3e-4 from
scratch), the patch budget and merge (the encoder's or the saved processor's), the run name and output folder.
Both the file and the flags go through transformers' `HfArgumentParser`, so `--help` lists every field with its help.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser

from processing.image_loading import MAX_IMAGE_BYTES

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# With no --config and no model named, the script runs the toy job described by this file.
DEFAULT_CONFIG = os.path.join(CONFIGS, "default.yaml")
MODEL_SOURCE_FIELDS = ("model_name_or_path", "text_model", "vision_model")

# The learning rate a run gets when neither its config nor its command line sets one.
LEARNING_RATES = {"lora": 2e-4, "projector": 1e-3, "fine-tune": 2e-5, "scratch": 3e-4}
SCRATCH_MAX_PATCHES = 256


@dataclass
class ModelArguments:
    """Where the model comes from, and which parts of it train."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved Llama3Siglip2 folder or hub id."})
    text_model: str | None = field(default=None, metadata={"help": "Llama checkpoint (hub id or folder) to compose."})
    vision_model: str | None = field(default=None, metadata={"help": "SigLIP2 checkpoint (hub id or folder) to compose."})
    spatial_merge_size: int | None = field(
        default=None,
        metadata={"help": "k: each k×k patch block becomes one image token (default: 1 when composing or from "
                          "scratch; a saved model keeps its own and refuses another)."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention backend for both towers."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype when loading (mixed precision is separate)."})
    min_patches: int | None = field(
        default=None, metadata={"help": "Smallest patch count per image (default: 1; a saved model keeps its own)."}
    )
    max_patches: int | None = field(
        default=None,
        metadata={"help": "Patch budget per image (default: the encoder's position grid, 256 for the NaFlex "
                          f"checkpoints; a saved model keeps its own; {SCRATCH_MAX_PATCHES} from scratch)."},
    )
    # From scratch (used when neither model_name_or_path nor text_model/vision_model is given).
    text_hidden_size: int = field(default=128, metadata={"help": "From scratch: the decoder's hidden width."})
    text_layers: int = field(default=2, metadata={"help": "From scratch: decoder layers."})
    text_heads: int = field(default=4, metadata={"help": "From scratch: decoder attention heads."})
    text_kv_heads: int = field(default=2, metadata={"help": "From scratch: decoder key/value heads (GQA)."})
    text_intermediate_size: int = field(default=384, metadata={"help": "From scratch: the decoder MLP's width."})
    vision_hidden_size: int = field(default=96, metadata={"help": "From scratch: the encoder's hidden width."})
    vision_layers: int = field(default=2, metadata={"help": "From scratch: encoder layers."})
    vision_heads: int = field(default=4, metadata={"help": "From scratch: encoder attention heads."})
    vision_intermediate_size: int = field(default=256, metadata={"help": "From scratch: the encoder MLP's width."})
    patch_size: int = field(default=8, metadata={"help": "From scratch: pixels per patch side."})
    vocab_size: int = field(default=320, metadata={"help": "From scratch: the byte-level BPE tokenizer's vocabulary."})
    embedding_rows: int | None = field(default=None, metadata={
        "help": "From scratch: rows of the decoder's embedding and lm_head (default: the tokenizer's size). Benchmarks "
                "set 128256 so a from-scratch model has Llama 3's embedding and lm_head; the tokenizer never emits "
                "the extra ids."})
    tie_word_embeddings: bool = field(default=True, metadata={
        "help": "From scratch: share lm_head with the input embedding (Llama 3.2 1B/3B do; 8B does not)."})
    # What trains.
    train_parts: str = field(default="all", metadata={"help": "projector | projector+llm | all"})
    use_lora: bool = field(default=False, metadata={"help": "PEFT LoRA adapters on the language model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names inside the language model."},
    )
    save_merged_lora: bool = field(default=False, metadata={"help": "Also save the model with adapters merged in."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ~30 %% more compute."}
    )


@dataclass
class DataArguments:
    """What the model learns from, how batches are packed, and what it is evaluated on."""

    dataset: str = field(default="scenes", metadata={"help": "'scenes' (embedded), a hub name, or a local path."})
    data_format: str = field(default="auto", metadata={"help": "caption | interleaved | chat | auto (from columns)"})
    data_files: str | None = field(default=None, metadata={"help": "Files for a builder such as parquet or json."})
    dataset_config: str | None = field(default=None, metadata={"help": "Subset name for load_dataset."})
    split: str = field(default="train", metadata={"help": "The split to train on."})
    image_column: str | None = field(default=None, metadata={"help": "Caption format: the image column (e.g. jpg)."})
    text_column: str | None = field(default=None, metadata={"help": "Caption format: the text column (e.g. txt)."})
    messages_column: str | None = field(default=None, metadata={"help": "Chat format: messages or conversations."})
    image_root: str | None = field(default=None, metadata={
        "help": "Folder that relative image paths start from (unset: the current directory)."})
    allow_paths_outside_image_root: bool = field(default=False, metadata={
        "help": "Load image paths that lead outside --image_root (../ or absolute paths elsewhere). Only for data "
                "you trust."})
    max_image_bytes: int = field(default=MAX_IMAGE_BYTES, metadata={
        "help": "Largest image file read, in bytes (default 256 MiB); larger ones are skipped as invalid_image."})
    on_bad_files: str = field(default="error", metadata={
        "help": "A data file that cannot be read (e.g. a truncated parquet shard): error (stop, naming it) | warn "
                "(skip it, logging its name) | skip (skip silently). Parquet data only."})
    max_skip_rate: float = field(default=0.5, metadata={
        "help": "Stop when more than this fraction of the examples read were skipped, once 200 were read (1 turns "
                "the check off)."})
    shuffle: bool = field(default=True, metadata={
        "help": "Shuffle map-style data each epoch (false: rank r of W reads rows r, r+W, ...)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data set instead of downloading it first."})
    strict: bool = field(default=False, metadata={"help": "Raise on the first bad sample instead of skipping it."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed row."})
    rows_per_batch: int = field(default=4, metadata={"help": "Packed rows per micro-batch on each process."})
    max_images: int | None = field(default=None, metadata={"help": "Image budget per micro-batch."})
    num_workers: int = field(default=0, metadata={"help": "Data loader worker processes per training process."})
    scenes_size: int = field(default=100_000, metadata={"help": "Length of the scenes train split."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out split of --dataset (or of --eval_data_files) for the eval loss and generated "
                          "samples, e.g. validation; 'eval' for scenes (default: none, or 'train' of "
                          "--eval_data_files)."},
    )
    eval_data_files: str | None = field(
        default=None,
        metadata={"help": "Files of a held-out set read like --data_files (same builder and format)."},
    )
    eval_samples: int = field(
        default=200,
        metadata={"help": "Held-out samples per evaluation: scenes for exact match (0: none), and at most this many "
                          "of the eval split for the eval loss (0: the whole split)."},
    )


@dataclass
class TrainArguments:
    """How the optimisation runs, where it writes, how it resumes, is evaluated and published."""

    config: str | None = field(
        default=None,
        metadata={"help": "YAML file of field values, applied before the command line (default: configs/default.yaml"
                          ", the toy job, when no model is named; none when --model_name_or_path or --text_model/"
                          "--vision_model is given; '' for none)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/<run_name>."})
    run_name: str | None = field(
        default=None, metadata={"help": "Name in the trackers and the default output folder (default: from the model)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the weights of new modules, the data order and dropout."})
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate (default: 2e-5 for a full fine-tune, 2e-4 with LoRA, 1e-3 for "
                          "--train_parts projector, 3e-4 from scratch; the toy default.yaml sets 2e-3)."},
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW's second-moment decay."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps before the schedule."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers' get_scheduler name: cosine, "
                                                                       "linear, constant_with_warmup, ..."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this."})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, no on CPU) | no | bf16 | fp16"})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Complete checkpoints kept; older ones are deleted."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    max_bad_steps: int = field(default=5, metadata={"help": "Stop after this many consecutive non-finite steps."})
    inject_nan_steps: str = field(default="", metadata={"help": "Testing aid: comma-separated steps whose loss is NaN."})
    log_every: int = field(default=10, metadata={"help": "Send the training metrics to the trackers every N steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none"})
    eval_before: bool = field(default=True, metadata={"help": "Scenes: measure exact match before training too."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Eval loss and generated samples every N steps, on --eval_split / --eval_data_files "
                          "(0: only at the end)."},
    )
    eval_generate_samples: int = field(
        default=4, metadata={"help": "Held-out samples generated and logged to the trackers at each evaluation."}
    )
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per evaluated sample."})
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub repo id to push final/ to, after report.json and the final evaluation are written. "
                          "Checked at start-up (a token, a valid name)."},
    )
    push_check_remote: bool = field(
        default=False, metadata={"help": "At start-up, also ask the Hub whose the token is (a network call)."}
    )
    license: str | None = field(
        default=None,
        metadata={"help": "The model card's licence (default: the base models' when their cards say it)."},
    )
    check_final_reload: bool = field(default=False, metadata={"help": "Reload final/ and compare its logits with "
                                                                       "the in-memory model's (report key)."})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the decoder and encoder layers "
                                                                  "(default: on GPU, off on CPU)."})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Chunked linear+cross-entropy over this many "
                                                                        "tokens, no fp32 logits (default: 2048 on GPU, "
                                                                        "0 = plain loss on CPU)."})
    log_sample_ids: bool = field(default=False, metadata={"help": "steps.jsonl also lists every rank's sample ids "
                                                                     "of each step (one more gather a step); the "
                                                                     "per-step digest is always there."})
    gc_every: int = field(default=50, metadata={"help": "Python's automatic garbage collection is off while training; "
                                                         "a young-generation collection runs every this many steps "
                                                         "on every rank (0: Python's own schedule)."})
    decoder_attention: str | None = field(default=None, metadata={"help": "Attention for the decoder alone, e.g. "
                                                                          "flex_attention (default: flex on GPU, the "
                                                                          "model's on CPU)."})
    profile_steps: int = field(default=0, metadata={"help": "torch.profiler over the last this many steps, on every "
                                                          "rank: profile/rank{R}.trace.json.gz and rank{R}.txt "
                                                          "(operators by host and device time) in output_dir."})
    pack_vision: bool = field(default=False, metadata={"help": "Encode each batch's images as one sequence of their "
                                                                "valid patches, no padding patches: 9 per cent faster "
                                                                "steps in the benchmark, 2 in the merge-2 trainer, for "
                                                                "more compiled graphs (BENCHMARKS.md)."})


SECTIONS = (ModelArguments, DataArguments, TrainArguments)


DESCRIPTION = (
    "Train a Llama 3 + SigLIP2 vision-language model. Values come from a YAML file, then from these flags. "
    "The file is --config FILE.yaml; without --config it is configs/default.yaml (the toy job: a tiny model from "
    "scratch on the embedded scenes set) when no model is named, and none when --model_name_or_path or "
    "--text_model/--vision_model names one: such a run starts from the defaults below, meant for real models."
)


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(SECTIONS, description=DESCRIPTION)


def names_a_model(model_args: ModelArguments) -> bool:
    return any(getattr(model_args, name) for name in MODEL_SOURCE_FIELDS)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """The YAML file (see the module docstring) supplies values, the flags override them, then run defaults settle."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # A first pass over the flags alone says whether a config was given and whether a model is named.
    flags_only, _, flags_train = parser.parse_args_into_dataclasses(args=argv)
    config_path = flags_train.config
    if config_path is None:
        config_path = "" if names_a_model(flags_only) else DEFAULT_CONFIG
    elif config_path and os.path.abspath(config_path) == DEFAULT_CONFIG and names_a_model(flags_only):
        raise ValueError(
            f"{config_path} is the toy job (a tiny model from scratch, lr 2e-3, 128-patch images): it does not fit "
            "the model named on the command line. Drop --config to get the defaults for real models, or pass a "
            "config of your own."
        )
    if config_path:
        parser.set_defaults(**read_config(config_path))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    train_args.config = config_path or None
    resolve_run_defaults(model_args, train_args)
    return model_args, data_args, train_args


def read_config(path: str) -> dict:
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    known = {f.name for section in SECTIONS for f in fields(section)} - {"config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    return values


def default_learning_rate(model_args: ModelArguments) -> float:
    if model_args.use_lora:
        return LEARNING_RATES["lora"]
    if not names_a_model(model_args):
        return LEARNING_RATES["scratch"]
    if model_args.train_parts == "projector":
        return LEARNING_RATES["projector"]
    return LEARNING_RATES["fine-tune"]


def default_run_name(model_args: ModelArguments) -> str:
    def short(name: str) -> str:
        return os.path.basename(os.path.normpath(name))

    if model_args.model_name_or_path:
        return short(model_args.model_name_or_path)
    if model_args.text_model or model_args.vision_model:
        return "+".join(short(name) for name in (model_args.text_model, model_args.vision_model) if name)
    return "scratch"


def resolve_run_defaults(model_args: ModelArguments, train_args: TrainArguments) -> None:
    """Fill the fields whose default depends on the run; the patch budget and merge are settled by the model factory."""
    if train_args.learning_rate is None:
        train_args.learning_rate = default_learning_rate(model_args)
    if train_args.run_name is None:
        train_args.run_name = default_run_name(model_args)
    if train_args.output_dir is None:
        train_args.output_dir = os.path.join("outputs", train_args.run_name)


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
        allow_paths_outside_image_root=data_args.allow_paths_outside_image_root,
        max_image_bytes=data_args.max_image_bytes,
        on_bad_files=data_args.on_bad_files,
        shuffle=data_args.shuffle,
        max_skip_rate=data_args.max_skip_rate,
    )


def eval_data_config(data_args: DataArguments, seed: int):
    """The held-out set, read once in order (no shuffle, one epoch), or None when the run names none."""
    if not (data_args.eval_split or data_args.eval_data_files):
        return None
    from dataclasses import replace

    return replace(
        data_config(data_args, seed),
        split=data_args.eval_split or "train",
        data_files=data_args.eval_data_files or data_args.data_files,
        shuffle=False,
        num_epochs=1,
        num_workers=0,
    )
