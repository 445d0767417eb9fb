"""Llama 3 decoder + SigLIP2 NaFlex encoder + MLP projector, composed from transformers' own models.

What is ours: the spatial merge of neighbouring patches, the projector, and the scatter of image features into the
token sequence. Everything else is transformers' `LlamaModel` and `Siglip2VisionModel`, unchanged, so that real
checkpoints load exactly and every attention backend, cache and kernel they support works here too.

Shape letters:
    B  rows in the text batch          S  tokens per row
    N  images in the batch             L  patches per (padded) image
    P  flattened patch pixels (3·p·p)  D  hidden width
    T  image tokens after the merge    K  patches merged into one token (k²)

Hub-travelling: imports only torch and transformers, and its sibling modules relatively.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, LlamaModel, PreTrainedModel, Siglip2VisionModel
from transformers.activations import ACT2FN
from transformers.initialization import guard_torch_init_functions
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .compat import CACHE_NAME, accepts_either_cache_name, cache_kwarg, output_cache
from .configuration_llama3_siglip2 import Llama3Siglip2Config
from .efficient_ops import (
    PACKED_BLOCK,
    PackedPatchLayout,
    chunked_causal_lm_loss,
    packed_attention_mask,
    packed_causal_block_mask,
    use_grouped_position_embeddings,
)
from .host_layout import HostBatchLayout, check_image_grids, host_to_device, mask_never_targets
from .saved_folder import SavedFolderMixin


# Both extend transformers' own output classes, so the cache field has the name this transformers gives it
# (`past_key_values` before 5.24, `cache` from 5.24 on).
@dataclass
class Llama3Siglip2ModelOutputWithPast(BaseModelOutputWithPast):
    """The decoder's outputs, plus the projected image tokens `(T, D)` that were scattered into the sequence."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class Llama3Siglip2CausalLMOutputWithPast(CausalLMOutputWithPast):
    """transformers' causal-LM outputs, plus the projected image tokens `(T, D)` that were scattered into the sequence."""

    image_hidden_states: torch.FloatTensor | None = None


class Llama3Siglip2LMHead(nn.Linear):
    """`nn.Linear` (same weights, same checkpoint key) whose call can also return the chunked training loss.

    The chunked loss multiplies the hidden states by `lm_head.weight` in slices. Doing that inside lm_head's own call
    lets sharding wrappers see the weight used where they expect it: FSDP2 unshards it in lm_head's pre-forward
    (reading it from outside gave "lm_head did not run forward before backward" every step), and ZeRO-3 gathers it
    in lm_head's pre-forward hook, so the chunked loss also runs under ZeRO-3.
    """

    def forward(self, hidden_states, labels=None, num_items_in_batch=None, ignore_index=-100, chunk_size=0,
                kept_positions=None):
        if labels is None:
            return super().forward(hidden_states)
        return chunked_causal_lm_loss(hidden_states, self.weight, labels, num_items_in_batch,
                                      ignore_index=ignore_index, chunk_size=chunk_size, kept_positions=kept_positions)


class Llama3Siglip2MultiModalProjector(nn.Module):
    """Linear(in, in) → act → Linear(in, text hidden), with in = vision hidden × k²."""

    def __init__(self, config: Llama3Siglip2Config):
        super().__init__()
        width = config.projector_input_size
        self.linear_1 = nn.Linear(width, width)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, image_tokens_TD: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_tokens_TD)))


# NaFlex batches bring a new (images, patches) shape almost every step, and packed text rows new mask shapes. cuDNN's
# attention, which sdpa prefers on Hopper, builds an execution plan on the host for each new shape: ~120 ms in each
# step whose image shape is new on an H200 (BENCHMARKS.md, "Where the time went"). Flash and memory-efficient
# attention need no per-shape set-up; sdpa picks among them (and the math fallback) as usual.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.compiler.disable  # host work from the batch's image grids: traced, every new grid would be a recompile
def merged_patch_index(spatial_shapes: list[tuple[int, int]], max_patches: int, merge_size: int, device,
                       image_starts: list[int] | None = None) -> torch.Tensor:
    """Flat indices into the (N·L) patches, shaped (T, K): row t lists the k×k patches that become image token t.

    Patches sit in raster order within each image (SigLIP2's layout, which its position embeddings assume), so a k×k
    block is not a run of consecutive entries: it is k rows of k patches, one image width apart. Tokens come out
    image by image, in raster order over the blocks; within a token, patches are in raster order over the block.
    `image_starts` (packed images) gives each image's first patch; by default image n starts at n·max_patches.
    """
    return host_to_device(_merged_patch_index_on_host(spatial_shapes, max_patches, merge_size, image_starts), device)


def _merged_patch_index_on_host(spatial_shapes: list[tuple[int, int]], max_patches: int, merge_size: int,
                                image_starts: list[int] | None = None):
    k, device = merge_size, torch.device("cpu")
    if image_starts is None:
        starts = torch.arange(len(spatial_shapes)) * max_patches
    else:
        starts = torch.tensor(image_starts, dtype=torch.long)
    heights = torch.tensor([h for h, _ in spatial_shapes])
    widths = torch.tensor([w for _, w in spatial_shapes])
    tokens_per_image = (heights // k) * (widths // k)
    total_tokens = sum((h // k) * (w // k) for h, w in spatial_shapes)
    image_of_token = torch.repeat_interleave(torch.arange(len(spatial_shapes), device=device), tokens_per_image,
                                             output_size=total_tokens)
    first_token_of_image = torch.cumsum(tokens_per_image, 0) - tokens_per_image
    token_in_image = torch.arange(total_tokens, device=device) - first_token_of_image[image_of_token]
    blocks_per_row = widths[image_of_token] // k
    block_row, block_col = token_in_image // blocks_per_row, token_in_image % blocks_per_row
    offsets = torch.arange(k, device=device)
    rows = block_row[:, None, None] * k + offsets[None, :, None]  # (T, k, 1)
    cols = block_col[:, None, None] * k + offsets[None, None, :]  # (T, 1, k)
    flat = starts[image_of_token][:, None, None] + rows * widths[image_of_token][:, None, None] + cols
    return flat.reshape(total_tokens, k * k)


class Llama3Siglip2PreTrainedModel(SavedFolderMixin, PreTrainedModel):
    config_class = Llama3Siglip2Config
    config: Llama3Siglip2Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Siglip2EncoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    # What both towers support: SigLIP2 has no flash or flex attention kernel in transformers.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    # A decoding step (text with a cache, static or dynamic) traces as one graph; the image prefill has one host sync.
    _can_compile_fullgraph = True

    @contextlib.contextmanager
    def host_layout(self, layout: HostBatchLayout | None):
        """Within it, forwards take the batch's image grids, placeholder positions and target positions from
        `layout` (`HostBatchLayout.of(batch, config)`, made before the batch moved) instead of reading them back from
        the GPU: two host syncs fewer per forward. The layout must come from the batch of that forward."""
        model = getattr(self, self.base_model_prefix, self)  # the Llama3Siglip2Model, inside the LM or itself
        previous, model.host_batch_layout = model.host_batch_layout, layout
        try:
            yield
        finally:
            model.host_batch_layout = previous

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' composite init: each sub-model (Llama, SigLIP2) initialises its own modules its own way.

        transformers treats a model class defined outside it as custom code, and then skips every module that holds
        no parameter of its own, in case its `_init_weights` would overwrite loaded weights. SigLIP2 initialises its
        attention, MLP and embeddings at that level, so the vision weights missing from a checkpoint came out with
        other distributions than the constructor's. Every `_init_weights` reached here is transformers' own or uses
        its guarded init functions, which leave loaded weights alone, so nothing is skipped.
        """

        def initialize(module, initialize_module):
            for child in module.children():
                initialize(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize_module)
            initialize_module(module, False)

        with guard_torch_init_functions():
            initialize(self, self._initialize_weights)


IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

class Llama3Siglip2Model(Llama3Siglip2PreTrainedModel):
    def __init__(self, config: Llama3Siglip2Config):
        super().__init__(config)
        self.vision_tower = Siglip2VisionModel(config.vision_config)
        # The same resize of SigLIP2's position grid as transformers', for all images in one matmul with no
        # per-image host sync (and right for images one patch wide, which the CPU interpolation gets wrong).
        use_grouped_position_embeddings(self.vision_tower)
        self.multi_modal_projector = Llama3Siglip2MultiModalProjector(config)
        self.language_model = LlamaModel(config.text_config)
        # Forwards encode every image's valid patches as one sequence (`efficient_ops.use_packed_vision`).
        self.pack_image_patches = False
        self.host_batch_layout: HostBatchLayout | None = None  # set for one call by `host_layout`
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _image_shapes(self, pixel_values_NLP, pixel_attention_mask_NL, spatial_shapes_N2, image_mask_BS=None):
        """Check the NaFlex trio against each other and the merge; return (h, w) per image and, given the
        placeholder mask, the flat positions of the placeholders (a host tensor; else None), read together: one
        host sync."""
        if pixel_values_NLP.dim() != 3:
            raise ValueError(f"pixel_values must be (N, L, P), got shape {tuple(pixel_values_NLP.shape)}")
        N, L, P = pixel_values_NLP.shape
        patch = self.config.vision_config.patch_size
        expected_P = self.config.vision_config.num_channels * patch * patch
        if P != expected_P:
            raise ValueError(f"pixel_values last dim is {P}, but patch_size {patch} needs {expected_P} (3·p·p)")
        if spatial_shapes_N2 is None or tuple(spatial_shapes_N2.shape) != (N, 2):
            got = None if spatial_shapes_N2 is None else tuple(spatial_shapes_N2.shape)
            raise ValueError(f"spatial_shapes must be ({N}, 2) for {N} images, got {got}")
        if pixel_attention_mask_NL is None or tuple(pixel_attention_mask_NL.shape) != (N, L):
            got = None if pixel_attention_mask_NL is None else tuple(pixel_attention_mask_NL.shape)
            raise ValueError(f"pixel_attention_mask must be ({N}, {L}), got {got}")
        # One host sync for the whole batch: the shapes decide how many image tokens there are.
        stats = torch.cat([spatial_shapes_N2, pixel_attention_mask_NL.sum(-1, keepdim=True)], dim=-1).view(-1)
        if image_mask_BS is not None:
            stats = torch.cat([stats, image_mask_BS.reshape(-1).to(stats.dtype)])
        stats = stats.cpu()
        positions = None if image_mask_BS is None else stats[3 * N :].nonzero().squeeze(1)  # on the host: no sync
        shapes = check_image_grids(stats[: 3 * N].view(N, 3).tolist(), L, self.config.spatial_merge_size)
        return shapes, positions

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.LongTensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode, merge and project the valid patches of every image.

        Returns transformers' `BaseModelOutputWithPooling`, as its image-text models do: `pooler_output` holds one
        `(T_n, D)` tensor of projected tokens per image n, in order (what the text's placeholders receive; an empty
        padding slot gives `(0, D)`); `last_hidden_state` `(N', L, D_vision)`, and on request `hidden_states` and
        `attentions`, are the vision tower's, for the N' images that have patches. Padding patches inside an image
        never reach `pooler_output`: SigLIP2's bidirectional mask keeps them out of attention, and the merge skips
        them.
        """
        shapes, _ = self._image_shapes(pixel_values, pixel_attention_mask, spatial_shapes)
        vision_outputs, image_tokens_TD = self._image_tokens(
            pixel_values, pixel_attention_mask, spatial_shapes, shapes, **kwargs
        )
        k = self.config.spatial_merge_size
        per_image = image_tokens_TD.split([(h // k) * (w // k) for h, w in shapes])
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=per_image,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )

    def _image_tokens(self, pixel_values, pixel_attention_mask, spatial_shapes, shapes, packed=False, **kwargs):
        """(vision tower outputs, (T, D) image tokens) for the images with patches; empty grids are padding slots.
        Packed (no per-image hidden states to return), the outputs are None."""
        keep = [i for i, (h, w) in enumerate(shapes) if h * w > 0]
        if len(keep) < len(shapes):
            keep_N = host_to_device(torch.tensor(keep, dtype=torch.long), pixel_values.device)
            pixel_values, pixel_attention_mask = pixel_values[keep_N], pixel_attention_mask[keep_N]
            spatial_shapes, shapes = spatial_shapes[keep_N], [shapes[i] for i in keep]
        return self._encode_and_project(pixel_values, pixel_attention_mask, spatial_shapes, shapes, packed, **kwargs)

    def _encode_and_project(self, pixel_values_NLP, pixel_attention_mask_NL, spatial_shapes_N2, shapes, packed=False,
                            **kwargs):
        if packed:
            return None, self._encode_packed_and_project(pixel_values_NLP, spatial_shapes_N2, shapes)
        N, L, _ = pixel_values_NLP.shape
        with sdpa_kernel(SDPA_BACKENDS):
            vision_outputs = self.vision_tower(
                pixel_values=pixel_values_NLP,
                pixel_attention_mask=pixel_attention_mask_NL,
                spatial_shapes=spatial_shapes_N2,
                return_dict=True,
                **kwargs,
            )
        hidden_NLD = vision_outputs.last_hidden_state
        index_TK = merged_patch_index(shapes, L, self.config.spatial_merge_size, hidden_NLD.device)
        merged_TD = hidden_NLD.reshape(N * L, -1)[index_TK].flatten(1)
        return vision_outputs, self.multi_modal_projector(merged_TD)

    def _encode_packed_and_project(self, pixel_values_NLP, spatial_shapes_N2, shapes) -> torch.Tensor:
        """(T, D) image tokens, the vision tower run over one sequence of all images' valid patches.

        transformers' own SigLIP2 modules, called one by one: the embeddings (on the padded layout, where the
        position grid is resized per image), the encoder layers over the packed patches with attention kept within
        each image (`packed_attention_mask`), the final norm. Padding patches never enter the encoder, so the result
        is the padded path's for every valid patch."""
        # transformers < 5.24 keeps the modules one level down, in `vision_model` (Siglip2VisionTransformer).
        vision = getattr(self.vision_tower, "vision_model", self.vision_tower)
        N, L, _ = pixel_values_NLP.shape
        device = pixel_values_NLP.device
        layout = PackedPatchLayout.from_shapes(shapes, L)
        with sdpa_kernel(SDPA_BACKENDS):
            embeddings_NLD = vision.embeddings(pixel_values_NLP, spatial_shapes_N2)
            packed_1MD = embeddings_NLD.reshape(N * L, -1).index_select(0, host_to_device(layout.source_index, device))
            mask = packed_attention_mask(host_to_device(layout.document_ids, device))
            hidden_1MD = vision.encoder(inputs_embeds=packed_1MD[None], attention_mask=mask).last_hidden_state
            hidden_MD = vision.post_layernorm(hidden_1MD)[0]
        index_TK = merged_patch_index(shapes, L, self.config.spatial_merge_size, device, layout.image_starts)
        return self.multi_modal_projector(hidden_MD[index_TK].flatten(1))

    def _builds_packed_block_mask(self, attention_mask, position_ids, cache, use_cache, inputs_embeds) -> bool:
        """Packed rows for a flex decoder, with no cache: the case `packed_causal_block_mask` covers."""
        return (
            self.language_model.config._attn_implementation == "flex_attention"
            and attention_mask is None
            and cache is None
            and use_cache is False
            and position_ids is not None
            and position_ids.shape == inputs_embeds.shape[:2]
            and inputs_embeds.shape[1] % PACKED_BLOCK == 0
        )

    def _dummy_image_features(self, device: torch.device) -> torch.Tensor:
        """Run both image modules on one k×k blank image, so every rank calls the same modules (FSDP, ZeRO-3).

        It must touch no parameter outside a module call: ZeRO-3 all-gathers a partitioned parameter read during the
        forward (`param.all_gather()` in DeepSpeed's `ZeROOrderedDict`), and a gather that only the text-only rank
        issues is a collective the other ranks never join, so the job hangs (DeepSpeed issue 7170). The pixels are
        fp32 like the processor's; SigLIP2 casts them to its own dtype inside its embedding's call.
        """
        k = self.config.spatial_merge_size
        vision = self.config.vision_config
        pixels = torch.zeros(1, k * k, vision.num_channels * vision.patch_size**2, device=device)
        mask = torch.ones(1, k * k, device=device, dtype=torch.long)
        shapes = torch.full((1, 2), k, device=device, dtype=torch.long)  # no host tensor: no copy, no sync
        return self._encode_and_project(pixels, mask, shapes, [(k, k)], packed=self.pack_image_patches)[1]

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """(B, S) mask of the image placeholder positions, from ids or, without them, from the embeddings."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def scatter_image_tokens(self, inputs_embeds_BSD, image_mask_BS, image_tokens_TD, placeholder_positions=None):
        """Put the image tokens, in order, at the placeholder positions. Counts must match exactly.

        `placeholder_positions`, the flat positions (B·S) of the placeholders as a host tensor when the caller has
        read them already, saves two host syncs: the count's, and the one in `masked_scatter`'s backward (a
        `masked_select`); `index_copy`'s backward is an `index_select`."""
        if placeholder_positions is not None:
            self._check_image_token_count(placeholder_positions.numel(), image_tokens_TD)
            B, S, D = inputs_embeds_BSD.shape
            index_T = host_to_device(placeholder_positions, inputs_embeds_BSD.device)
            image_tokens_TD = image_tokens_TD.to(inputs_embeds_BSD.device, inputs_embeds_BSD.dtype)
            return inputs_embeds_BSD.reshape(B * S, D).index_copy(0, index_T, image_tokens_TD).view(B, S, D)
        # The count is checked on the host in eager mode; under torch.compile the read would break the graph.
        if not torch.compiler.is_compiling():
            self._check_image_token_count(int(image_mask_BS.sum()), image_tokens_TD)
        image_tokens_TD = image_tokens_TD.to(inputs_embeds_BSD.device, inputs_embeds_BSD.dtype)
        return inputs_embeds_BSD.masked_scatter(image_mask_BS.unsqueeze(-1), image_tokens_TD)

    def _check_image_token_count(self, n_placeholders: int, image_tokens_TD) -> None:
        if n_placeholders != image_tokens_TD.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_placeholders} image tokens "
                f"(id {self.config.image_token_id}) but the images give {image_tokens_TD.shape[0]} features"
            )

    @can_return_tuple
    @accepts_either_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | Llama3Siglip2ModelOutputWithPast:
        r"""
        cache: the decoder's key-value cache (transformers' `Cache`); also accepted as `past_key_values`.
        kwargs: transformers' model kwargs (`output_attentions`, `output_hidden_states`, attention-backend
            arguments), passed to the decoder, which records attentions and hidden states itself.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        kwargs.pop("num_items_in_batch", None)  # a loss argument: the decoder has no use for it
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_tokens_TD = None
        images = 0 if pixel_values is None else pixel_values.shape[0]
        layout = self.host_batch_layout
        if layout is not None:
            layout.check_fits(input_ids, images)
        if images > 0:
            if layout is None:
                image_mask_BS = self.image_token_mask(input_ids, inputs_embeds)
                shapes, positions = self._image_shapes(pixel_values, pixel_attention_mask, spatial_shapes, image_mask_BS)
            else:  # read on the host before the batch moved: no sync, and no mask to scatter by
                image_mask_BS, shapes, positions = None, layout.image_shapes, layout.placeholder_positions
            image_tokens_TD = self._image_tokens(
                pixel_values, pixel_attention_mask, spatial_shapes, shapes, packed=self.pack_image_patches
            )[1]
            inputs_embeds = self.scatter_image_tokens(inputs_embeds, image_mask_BS, image_tokens_TD, positions)
        elif self.training or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # A text-only batch still calls the image modules, with a zero contribution, so that sharded ranks
            # (FSDP, ZeRO-3) gather the same parameters in the same order and never wait on each other.
            inputs_embeds = inputs_embeds + 0.0 * self._dummy_image_features(inputs_embeds.device).sum()

        if use_cache is None and attention_mask is None and position_ids is not None and cache is None:
            # Position ids without a mask mean packed rows; transformers derives per-sample masks only without a cache.
            use_cache = False
        if self._builds_packed_block_mask(attention_mask, position_ids, cache, use_cache, inputs_embeds):
            # The same per-sample causal mask transformers would build for flex, from block summaries: its builder
            # evaluates the mask at every (S × S) position on the host's behalf and reads the device once.
            attention_mask = packed_causal_block_mask(position_ids)
        with sdpa_kernel(SDPA_BACKENDS):
            outputs = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **cache_kwarg(cache),
                **kwargs,
            )
        return Llama3Siglip2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_tokens_TD,
            **cache_kwarg(output_cache(outputs)),
        )


class Llama3Siglip2ForConditionalGeneration(Llama3Siglip2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As transformers' Llama: the head's vocabulary is split across tensor-parallel ranks and the logits gathered; a
    # pipeline stage that holds the head turns hidden states into logits.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Llama3Siglip2Config):
        super().__init__(config)
        self.model = Llama3Siglip2Model(config)
        self.lm_head = Llama3Siglip2LMHead(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.LongTensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """See `Llama3Siglip2Model.get_image_features`."""
        return self.model.get_image_features(pixel_values, pixel_attention_mask, spatial_shapes, **kwargs)

    @can_return_tuple
    @accepts_either_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shift_labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | Llama3Siglip2CausalLMOutputWithPast:
        r"""
        labels (`(B, S)`): targets for the shifted next-token loss; `config.ignore_index` marks positions to skip.
        shift_labels (`(B, S)`): targets already aligned with the positions (position s predicts `shift_labels[s]`),
            used instead of `labels`. Context-parallel training shifts the full sequence before sharding it, so each
            shard's last token keeps its target.
            In either, the image placeholder, `<boi>` and `<eoi>` ids are never targets: the images come from the
            user, and the model is not taught to emit them.
        num_items_in_batch (in kwargs): the number of target tokens in the whole (accumulated, all-rank) batch. With
            it the loss is a sum divided by that number, so gradient accumulation averages over tokens.
        logits_to_keep: compute logits only for the last N positions (an int), or for the given indices (a tensor).
        cache: the decoder's key-value cache (transformers' `Cache`); also accepted as `past_key_values`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        wants_loss = labels is not None or shift_labels is not None
        if wants_loss and use_cache is None:
            use_cache = False
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_BSD = outputs.last_hidden_state
        extra = dict(
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **cache_kwarg(output_cache(outputs)),
        )
        # Not under tensor parallelism: there lm_head's weight is a vocabulary shard and its call gathers logits.
        if wants_loss and self.training and self.config.loss_chunk_size and (self.tp_size or 1) == 1:
            # Training needs only the loss: skip the (B, S, V) logits, in fp32 the largest tensor of the step.
            hidden_BSD, labels_BS = self._chunked_loss_inputs(hidden_BSD, labels, shift_labels)
            layout = self.model.host_batch_layout
            kept = layout.target_positions if layout is not None and shift_labels is None else None
            loss = self.lm_head(hidden_BSD, labels=labels_BS, num_items_in_batch=num_items_in_batch,
                                ignore_index=self.config.ignore_index, chunk_size=self.config.loss_chunk_size,
                                kept_positions=kept)
            return Llama3Siglip2CausalLMOutputWithPast(loss=loss, **extra)

        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_BSD[:, keep, :])
        loss = None
        if wants_loss:
            loss = self.causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)
        return Llama3Siglip2CausalLMOutputWithPast(loss=loss, logits=logits, **extra)

    def loss_targets(self, labels_BS: torch.Tensor) -> torch.Tensor:
        """The labels with the image placeholder, `<boi>` and `<eoi>` ids replaced by `config.ignore_index`."""
        return mask_never_targets(labels_BS, self.config)

    def _chunked_loss_inputs(self, hidden_BSD, labels_BS, shift_labels_BS):
        """(hidden, labels) for `chunked_causal_lm_loss`, which shifts its labels itself.

        For `shift_labels`, one blank position goes after the last and each target moves one place right, so that
        the last position keeps its target (the blank one predicts nothing).
        """
        if shift_labels_BS is None:
            return hidden_BSD, self.loss_targets(labels_BS)
        targets_BS = self.loss_targets(shift_labels_BS)
        return F.pad(hidden_BSD, (0, 0, 0, 1)), F.pad(targets_BS, (1, 0), value=self.config.ignore_index)

    def causal_lm_loss(self, logits_BSV, labels_BS, num_items_in_batch=None, shift_labels=None) -> torch.Tensor:
        """transformers' shifted causal-LM cross-entropy (fp32), skipping `config.ignore_index` and the image ids."""
        return ForCausalLMLoss(
            logits_BSV,
            None if labels_BS is None else self.loss_targets(labels_BS),
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=self.config.ignore_index,
            shift_labels=None if shift_labels is None else self.loss_targets(shift_labels),
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers' copies of each row (one per beam or returned sequence), each row followed by its own images.

        transformers repeats each image in place, which pairs rows with images only when every row has one image:
        with rows of 2 and 1 images, copies of row 0 would get images 0, 0 where they need 0, 1.
        """
        images = {key: model_kwargs.pop(key) for key in IMAGE_INPUTS if model_kwargs.get(key) is not None}
        if images and expand_size > 1:
            counts = self._images_per_row(input_ids, model_kwargs.get("inputs_embeds")).tolist()
            n_images = images["pixel_values"].shape[0]
            if sum(counts) != n_images:
                raise ValueError(f"The rows hold {sum(counts)} images (<boi> tokens, {counts} per row) but "
                                 f"pixel_values has {n_images}")
            starts = [sum(counts[:row]) for row in range(len(counts))]
            index = [i for row, count in enumerate(counts) for _ in range(expand_size)
                     for i in range(starts[row], starts[row] + count)]
            index = torch.tensor(index, dtype=torch.long, device=images["pixel_values"].device)
            images = {key: value[index] for key, value in images.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **images}

    def _images_per_row(self, input_ids, inputs_embeds) -> torch.Tensor:
        """(B,) images in each row: its `<boi>` tokens, found in the ids or, without them, in the embeddings."""
        if input_ids is not None and input_ids.shape[-1] > 0:
            return (input_ids == self.config.boi_token_id).sum(-1)
        boi = self.get_input_embeddings()(torch.tensor(self.config.boi_token_id, device=inputs_embeds.device))
        return (inputs_embeds == boi).all(-1).sum(-1)

    @accepts_either_cache_name
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        pixel_values=None,
        pixel_attention_mask=None,
        spatial_shapes=None,
        is_first_iteration=False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **cache_kwarg(cache),
            **kwargs,
        )
        # The images are encoded once, in the prefill; later steps read their keys and values from the cache.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(
                pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
            )
        return model_inputs


__all__ = ["Llama3Siglip2ForConditionalGeneration", "Llama3Siglip2Model", "Llama3Siglip2PreTrainedModel"]
