"""Build a Llama3Siglip2 model and its processor from a Llama checkpoint and a SigLIP2 checkpoint.

Each side is loaded by transformers' own `from_pretrained` (a hub id or a local folder), so whatever transformers can
load, we can: sharded safetensors, a full `Siglip2Model` or a vision-only one. The weights are then copied unchanged
into the composed model; only the projector is new. The image special tokens are added to the tokenizer where missing,
and the new embedding rows start at the mean of the old ones, so the new tokens begin "average" instead of random.

The model's generation config ends generation at `<|end_of_text|>` and at the chat template's end of turn
(`<|eot_id|>`, and `<|eom_id|>` where the tokenizer has it), as Llama 3 Instruct's does: a model fine-tuned on chats
ends each answer with `<|eot_id|>`, and with `<|end_of_text|>` alone it would run on to `max_new_tokens`.
`default_generation_config(tokenizer)` and `chat_eos_token_ids(tokenizer)` give the same to models built elsewhere
(the training script's model from scratch).

This module is not Hub-travelling: it is the way in, not part of a saved checkpoint.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    Siglip2Model,
    Siglip2VisionModel,
)
from transformers.image_processing_utils import ImageProcessingMixin

from processing import Llama3Siglip2ImageProcessor, Llama3Siglip2Processor

from .configuration_llama3_siglip2 import Llama3Siglip2Config
from .modeling_llama3_siglip2 import Llama3Siglip2ForConditionalGeneration


def load_vision_tower(vision_model: str, **load_kwargs) -> Siglip2VisionModel:
    """A SigLIP2 vision model from a vision-only checkpoint or from the vision half of a full `Siglip2Model`."""
    model_type = AutoConfig.from_pretrained(vision_model).model_type
    if model_type == "siglip2":
        return Siglip2Model.from_pretrained(vision_model, **load_kwargs).vision_model
    if model_type == "siglip2_vision_model":
        return Siglip2VisionModel.from_pretrained(vision_model, **load_kwargs)
    raise ValueError(f"{vision_model}: expected a SigLIP2 checkpoint (siglip2 or siglip2_vision_model), got {model_type}")


def build_image_processor(vision_model: str, patch_size: int, **options) -> Llama3Siglip2ImageProcessor:
    """Our image processor, with the vision checkpoint's own normalisation where it ships a preprocessor config."""
    try:
        # The raw preprocessor_config.json: no image-processor class needed (some need torchvision).
        reference, _ = ImageProcessingMixin.get_image_processor_dict(vision_model)
    except OSError:
        reference = {}  # None shipped: SigLIP2's 0.5/0.5 defaults apply.
    for key in ("image_mean", "image_std"):
        if key in reference:
            options.setdefault(key, list(reference[key]))
    return Llama3Siglip2ImageProcessor(patch_size=patch_size, **options)


# Tokens that end a Llama 3 reply: the end of the text, of a tool-call message (3.1+), of a turn.
END_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def chat_eos_token_ids(tokenizer, extra_ids=None) -> list[int]:
    """The ids that end generation for a Llama 3 chat model: the tokenizer's eos, then those of `END_TOKENS` that are
    tokens of the tokenizer, then `extra_ids` (an id or a list, e.g. a checkpoint's own), each once.

    For a Llama 3.1 tokenizer this is Llama 3.1 Instruct's list, [128001, 128008, 128009].
    """
    ids: list[int] = []
    for token in (tokenizer.eos_token, *END_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    extra = [] if extra_ids is None else [extra_ids] if isinstance(extra_ids, int) else list(extra_ids)
    return ids + [token_id for token_id in extra if token_id not in ids]


def default_generation_config(tokenizer, pad_token_id: int | None = None) -> GenerationConfig:
    """Greedy decoding that stops at any of `chat_eos_token_ids(tokenizer)`, with the tokenizer's bos and pad.

    Set it on a newly built model: `model.generation_config = default_generation_config(processor.tokenizer)`.
    """
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=chat_eos_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
    )


def resize_embeddings_to_mean(model, new_vocab_size: int) -> None:
    """Grow the input (and untied output) embeddings to `new_vocab_size`, new rows = mean of the old rows."""
    old_vocab_size = model.get_input_embeddings().weight.shape[0]
    if new_vocab_size <= old_vocab_size:
        return
    model.resize_token_embeddings(new_vocab_size, mean_resizing=False)
    with torch.no_grad():
        for embedding in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            weight = embedding.weight
            weight[old_vocab_size:] = weight[:old_vocab_size].mean(dim=0, keepdim=True)


def from_pretrained_components(
    text_model: str,
    vision_model: str,
    *,
    spatial_merge_size: int = 1,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "sdpa",
    min_patches: int = 1,
    max_patches: int | None = None,
    projector_hidden_act: str = "gelu",
) -> tuple[Llama3Siglip2ForConditionalGeneration, Llama3Siglip2Processor]:
    """Compose a model from a Llama(ForCausalLM) checkpoint and a SigLIP2 checkpoint; returns (model, processor).

    Args:
        text_model: hub id or folder of a Llama checkpoint with its tokenizer (e.g. "meta-llama/Llama-3.2-1B").
        vision_model: hub id or folder of a SigLIP2 checkpoint (e.g. "google/siglip2-base-patch16-naflex").
        spatial_merge_size: k; each k×k block of patches becomes one image token.
        dtype: weights' dtype (e.g. torch.bfloat16); None keeps the checkpoints' default (float32).
        attn_implementation: passed to both towers ("sdpa", "eager", ...).
        min_patches, max_patches: the image processor's patch budget per image (before the merge). `max_patches`
            defaults to the vision checkpoint's position grid (`num_patches`, 256 for the NaFlex checkpoints).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    load_kwargs = {"dtype": dtype} if dtype is not None else {}
    text = LlamaForCausalLM.from_pretrained(text_model, **load_kwargs)
    vision = load_vision_tower(vision_model, **load_kwargs)

    image_processor = build_image_processor(
        vision_model,
        patch_size=vision.config.patch_size,
        merge_size=spatial_merge_size,
        min_patches=min_patches,
        max_patches=max_patches or vision.config.num_patches,
    )
    processor = Llama3Siglip2Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(text_model))

    text_config = text.config.to_dict()
    text_config["pad_token_id"] = processor.pad_token_id
    # Tokens the processor added get embedding rows (see resize_embeddings_to_mean).
    text_config["vocab_size"] = max(text.config.vocab_size, len(processor.tokenizer))
    config = Llama3Siglip2Config(
        text_config=text_config,
        vision_config=vision.config.to_dict(),
        spatial_merge_size=spatial_merge_size,
        projector_hidden_act=projector_hidden_act,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        tie_word_embeddings=bool(text.config.tie_word_embeddings),
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    resize_embeddings_to_mean(text, config.text_config.vocab_size)
    model = Llama3Siglip2ForConditionalGeneration(config)
    if dtype is not None:
        model.to(dtype)
    model.model.language_model.load_state_dict(text.model.state_dict())
    # SigLIP2's pooling head is not part of the VLM (see the config); every other tensor must match exactly.
    vision_state = {name: t for name, t in vision.state_dict().items() if not name.startswith("head.")}
    model.model.vision_tower.load_state_dict(vision_state)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.tie_weights()
    model.generation_config = default_generation_config(processor.tokenizer, processor.pad_token_id)
    model.generation_config.eos_token_id = chat_eos_token_ids(
        processor.tokenizer, text.generation_config.eos_token_id
    )
    if text.generation_config.bos_token_id is not None:
        model.generation_config.bos_token_id = text.generation_config.bos_token_id
    return model, processor
