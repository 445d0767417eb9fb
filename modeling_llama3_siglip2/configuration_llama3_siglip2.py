"""Configuration of the Llama 3 + SigLIP2 NaFlex vision-language model.

The config composes transformers' own `LlamaConfig` (text) and `Siglip2VisionConfig` (vision) and adds what is ours:
the spatial merge, the projector's activation and the image special tokens. It is Hub-travelling: it imports only
transformers, so `save_pretrained` can copy it next to the weights for `trust_remote_code` loading.
"""

from transformers import LlamaConfig, PretrainedConfig, Siglip2VisionConfig

_SUB_CONFIG_CLASSES = {"text_config": LlamaConfig, "vision_config": Siglip2VisionConfig}


class Llama3Siglip2Config(PretrainedConfig):
    r"""
    Args:
        text_config (`LlamaConfig` or `dict`, *optional*): the decoder. Defaults to `LlamaConfig()`.
        vision_config (`Siglip2VisionConfig` or `dict`, *optional*): the NaFlex encoder. Defaults to
            `Siglip2VisionConfig()` (base, patch 16, 256-patch position grid).
        spatial_merge_size (`int`, *optional*, defaults to 1): k merges each k×k block of neighbouring patches of an
            image into one token before the projector (1 = off). Images must have grids divisible by k; the image
            processor guarantees that.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`): activation between the projector's linears.
        image_token_id, boi_token_id, eoi_token_id (`int`): the image placeholder and the tokens around each image.
        ignore_index (`int`, *optional*, defaults to -100): label value that the loss skips.
        loss_chunk_size (`int`, *optional*, defaults to 0): above 0, a training forward with labels computes the
            loss over this many target tokens at a time, never holding the (tokens × vocabulary) fp32 logits, and
            returns no logits (see `efficient_ops.chunked_causal_lm_loss`). 0 keeps transformers' plain loss.
        tie_word_embeddings (`bool`, *optional*): share `lm_head` with the input embeddings. Defaults to the text
            config's own setting (Llama 3.2 1B/3B tie, 8B does not).
    """

    model_type = "llama3_siglip2"
    # transformers >= 5.23 reads `sub_configs_defaults`; 5.17 reads `sub_configs`. Both must be declared, otherwise
    # `attn_implementation` and dtype are not propagated into the two towers' configs.
    sub_configs_defaults = dict(_SUB_CONFIG_CLASSES)
    sub_configs = dict(_SUB_CONFIG_CLASSES)

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    spatial_merge_size: int = 1
    projector_hidden_act: str = "gelu"
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    ignore_index: int = -100
    loss_chunk_size: int = 0
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        for key, config_class in _SUB_CONFIG_CLASSES.items():
            value = getattr(self, key)
            if value is None:
                value = config_class()
            elif isinstance(value, dict):
                value = config_class(**{k: v for k, v in value.items() if k != "model_type"})
            setattr(self, key, value)
        # The VLM reads SigLIP2's patch features; its pooling head would be parameters with no gradient (which DDP
        # rejects) and dead weight in every checkpoint.
        self.vision_config.vision_use_head = False
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        # The text config decides whether the decoder's `lm_head` is tied; keep both views in agreement.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if getattr(self, name) is None:
                # No tokenizer yet (a bare config): reserve the last three ids of the vocabulary.
                setattr(self, name, vocab_size - {"image_token_id": 3, "boi_token_id": 2, "eoi_token_id": 1}[name])
        super().__post_init__(**kwargs)
        self.validate_llama3_siglip2()

    def validate_llama3_siglip2(self):
        """Raise a `ValueError` that names the field for any setting the model cannot run with."""
        if not isinstance(self.spatial_merge_size, int) or self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be an integer >= 1, got {self.spatial_merge_size!r}")
        grid = round(self.vision_config.num_patches**0.5)
        if grid * grid != self.vision_config.num_patches:
            raise ValueError(f"vision_config.num_patches must be a square (SigLIP2's position grid), got "
                             f"{self.vision_config.num_patches}")
        vocab_size = self.text_config.vocab_size
        ids = {name: getattr(self, name) for name in ("image_token_id", "boi_token_id", "eoi_token_id")}
        for name, token_id in ids.items():
            if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(f"{name}={token_id!r} is outside the text vocabulary [0, {vocab_size})")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"image_token_id, boi_token_id and eoi_token_id must differ, got {ids}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be an integer >= 0, got {self.loss_chunk_size!r}")
        if self.ignore_index >= 0:
            raise ValueError(f"ignore_index must be negative so it never collides with a token id, got {self.ignore_index}")

    @property
    def projector_input_size(self) -> int:
        """Width of one merged image token: the vision hidden size times k²."""
        return self.vision_config.hidden_size * self.spatial_merge_size**2


__all__ = ["Llama3Siglip2Config"]
