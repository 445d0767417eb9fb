"""Build the model and processor a run trains, then choose which parameters train (freezing, LoRA).

Three sources, chosen by which arguments are set:
    1. `model_name_or_path`: a saved Llama3Siglip2 folder or hub id (`from_pretrained`);
    2. `text_model` + `vision_model`: composed from real checkpoints (`from_pretrained_components`);
    3. neither: a small model from scratch, with a byte-level BPE tokenizer trained at start on the data's text.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_llama3_siglip2 import (
    Llama3Siglip2Config,
    Llama3Siglip2ForConditionalGeneration,
    Llama3Siglip2ImageProcessor,
    Llama3Siglip2Processor,
    build_byte_level_bpe_tokenizer,
    from_pretrained_components,
)
from modeling_llama3_siglip2.builder import chat_eos_token_ids, default_generation_config
from processing.scenes import COLOUR_NAMES, scene_caption

from .arguments import SCRATCH_MAX_PATCHES

TRAIN_PARTS = {
    "projector": ("model.multi_modal_projector.",),
    "projector+llm": ("model.multi_modal_projector.", "model.language_model.", "lm_head."),
    "all": ("",),
}


def scratch_tokenizer_corpus() -> list[str]:
    """Every scenes caption, plus plain English for other text: byte-level BPE still encodes any string."""
    captions = [scene_caption(left, right) for left in COLOUR_NAMES for right in COLOUR_NAMES if left != right]
    return captions + ["The quick brown fox jumps over the lazy dog. What is in the image? Describe it."]


def build_model_and_processor(model_args):
    dtype = getattr(torch, model_args.dtype)
    if model_args.model_name_or_path:
        model = AutoModelForImageTextToText.from_pretrained(
            model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation
        )
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
        # A checkpoint saved with one eos (older runs, base models) would never stop after a chat turn.
        model.generation_config.eos_token_id = chat_eos_token_ids(processor.tokenizer,
                                                                  model.generation_config.eos_token_id)
        apply_patch_budget(model, processor, model_args)
        return model, processor
    if model_args.text_model or model_args.vision_model:
        if not (model_args.text_model and model_args.vision_model):
            raise ValueError("Composing a model needs both --text_model and --vision_model")
        return from_pretrained_components(
            model_args.text_model,
            model_args.vision_model,
            spatial_merge_size=model_args.spatial_merge_size or 1,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
            min_patches=model_args.min_patches or 1,
            max_patches=model_args.max_patches,  # None: the encoder's position grid
        )
    return build_scratch_model(model_args, scratch_tokenizer_corpus())


def apply_patch_budget(model, processor, model_args) -> None:
    """A saved model keeps its processor's patch budget unless the run sets one; its merge is fixed by its weights."""
    saved_merge = model.config.spatial_merge_size
    if model_args.spatial_merge_size is not None and model_args.spatial_merge_size != saved_merge:
        raise ValueError(
            f"{model_args.model_name_or_path} was trained with spatial_merge_size {saved_merge} (its projector's "
            f"input width depends on it); --spatial_merge_size {model_args.spatial_merge_size} cannot change that"
        )
    image_processor = processor.image_processor
    if model_args.min_patches is not None:
        image_processor.min_patches = model_args.min_patches
    if model_args.max_patches is not None:
        image_processor.max_patches = model_args.max_patches


def build_scratch_model(model_args, tokenizer_corpus):
    """A small model with random weights; its tokenizer is trained on `tokenizer_corpus` in well under a second."""
    tokenizer = build_byte_level_bpe_tokenizer(tokenizer_corpus, vocab_size=model_args.vocab_size)
    max_patches = model_args.max_patches or SCRATCH_MAX_PATCHES
    merge = model_args.spatial_merge_size or 1
    image_processor = Llama3Siglip2ImageProcessor(
        patch_size=model_args.patch_size,
        merge_size=merge,
        min_patches=model_args.min_patches or 1,
        max_patches=max_patches,
    )
    processor = Llama3Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Llama3Siglip2Config(
        text_config={
            "vocab_size": max(len(processor.tokenizer), model_args.embedding_rows or 0),
            "hidden_size": model_args.text_hidden_size,
            "intermediate_size": model_args.text_intermediate_size,
            "num_hidden_layers": model_args.text_layers,
            "num_attention_heads": model_args.text_heads,
            "num_key_value_heads": model_args.text_kv_heads,
            "max_position_embeddings": 4096,
            "bos_token_id": processor.tokenizer.bos_token_id,
            "eos_token_id": processor.tokenizer.eos_token_id,
            "pad_token_id": processor.pad_token_id,
            "tie_word_embeddings": model_args.tie_word_embeddings,
        },
        vision_config={
            "hidden_size": model_args.vision_hidden_size,
            "intermediate_size": model_args.vision_intermediate_size,
            "num_hidden_layers": model_args.vision_layers,
            "num_attention_heads": model_args.vision_heads,
            "patch_size": model_args.patch_size,
            # SigLIP2 keeps a square grid of position embeddings and resizes it to each image's grid.
            "num_patches": math.ceil(math.sqrt(max_patches)) ** 2,
        },
        spatial_merge_size=merge,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        attn_implementation=model_args.attn_implementation,
    )
    model = Llama3Siglip2ForConditionalGeneration(config)
    init_position_grid_sincos(model.model.vision_tower.embeddings.position_embedding.weight)
    model = model.to(getattr(torch, model_args.dtype))
    model.generation_config = default_generation_config(processor.tokenizer, pad_token_id=processor.pad_token_id)
    return model, processor


@torch.no_grad()
def init_position_grid_sincos(weight_GD: torch.Tensor) -> None:
    """Start SigLIP2's square grid of position embeddings as a 2-D sine-cosine table (as in MAE) instead of noise.

    A model trained from scratch must learn where each patch is; with the grid already smooth in both directions,
    the resize to each image's grid keeps left apart from right from the first step.
    """
    grid_size, width = round(weight_GD.shape[0] ** 0.5), weight_GD.shape[1]
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    coordinates = torch.arange(grid_size, dtype=torch.float32)
    angles = coordinates[:, None] * frequencies[None, :]  # (grid, quarter)
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, 2·quarter)
    rows = per_axis[:, None, :].expand(grid_size, grid_size, -1)
    cols = per_axis[None, :, :].expand(grid_size, grid_size, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, -1)
    weight_GD.zero_()
    weight_GD[:, : table.shape[1]] = table.to(weight_GD.dtype)


def select_trainable(model, model_args):
    """Freeze all but `train_parts`, or wrap the language model's linears with LoRA adapters (peft)."""
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        # Adapters only inside the decoder: a regex over full module names keeps SigLIP2's q/k/v out.
        pattern = r".*language_model.*\.(" + "|".join(targets) + r")$"
        lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                          target_modules=pattern, modules_to_save=["multi_modal_projector"])
        return get_peft_model(model, lora)
    if model_args.train_parts not in TRAIN_PARTS:
        raise ValueError(f"train_parts must be one of {sorted(TRAIN_PARTS)}, got {model_args.train_parts!r}")
    prefixes = TRAIN_PARTS[model_args.train_parts]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    return model


def parameter_count(parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (the local tensor is then empty)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def parameter_counts(model) -> tuple[int, int]:
    total = sum(parameter_count(p) for p in model.parameters())
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return total, trainable

