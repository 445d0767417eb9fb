"""Faster, leaner drop-ins for three steps of training, each computing the same function as the plain path.

- `chunked_causal_lm_loss`: transformers' `ForCausalLMLoss(lm_head(hidden), labels)` without ever holding the
  (tokens × vocabulary) logits in memory. Positions whose target is `ignore_index` (image tokens, padding, the first
  token of each packed sample) are dropped before the matmul, and the rest go through the vocabulary in chunks.
- `grouped_resize_positional_embeddings`: SigLIP2's per-image bilinear antialiased resize of its position grid, as one
  matmul for the whole batch with no host sync. `use_grouped_position_embeddings` installs it on a vision tower.
- `compile_layers` and `use_decoder_attention`: `torch.compile` per repeated layer, and an attention backend for the
  decoder alone (SigLIP2 has no flex attention in transformers).
- `use_packed_vision`: the vision tower runs over one sequence of every image's valid patches, attention kept within
  each image, instead of over images padded to the longest (a third of NaFlex patches are padding).

Shape letters:
    B  rows in the batch        S  tokens per row         D  hidden width
    V  vocabulary size          M  tokens with a target   C  tokens in one chunk
    N  images                   L  patches per (padded) image
    H, W  the stored position grid (both `sqrt(num_patches)`)    G  target sizes 1..G covered by the cache

Hub-travelling: imports only torch and transformers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .host_layout import IGNORE_INDEX, host_to_device

# 2048 tokens × 128k vocabulary is 1 GiB of fp32 logits: large enough to keep the matmul efficient, small next to
# the 6+ GiB the plain path holds for a 4096-token row.
DEFAULT_CHUNK_SIZE = 2048


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype `lm_head` would run in here: autocast's if it is on for this device, else the tensor's own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """scale · Σ_m cross_entropy(hidden_MD @ weight_VD.T, targets_M), gradients computed in the same pass.

    Each chunk's logits are made, reduced to the loss and turned into their gradient before the next chunk, so the
    peak is one (C, V) block. The gradients are kept for `backward`, which only multiplies them by the incoming
    gradient: one matmul pass fewer than recomputing the logits there, for a (V, D) fp32 accumulator held until then.
    `scale` (1 / targets, or 1 / num_items_in_batch) is applied before the gradient is rounded to the compute dtype,
    as `cross_entropy`'s backward does, so that both paths round the same numbers.
    """

    @staticmethod
    def forward(ctx, hidden_MD, weight_VD, targets_M, scale, chunk_size, compute_dtype, grad_enabled):
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        M = hidden_MD.shape[0]
        loss_sum = torch.zeros((), device=hidden_MD.device, dtype=torch.float32)
        grad_hidden_MD = torch.empty_like(hidden_MD) if need_hidden_grad else None
        grad_weight_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if need_weight_grad else None
        with torch.autocast(hidden_MD.device.type, enabled=False):
            weight_c = weight_VD.to(compute_dtype)
            for start in range(0, M, chunk_size):
                hidden_CD = hidden_MD[start : start + chunk_size].to(compute_dtype)
                targets_C1 = targets_M[start : start + chunk_size, None]
                # Logits in the compute dtype, then fp32: the rounding the plain path (lm_head, then .float()) has.
                logits_CV = (hidden_CD @ weight_c.T).float()
                target_logit_C1 = logits_CV.gather(1, targets_C1)
                max_C1 = logits_CV.amax(dim=1, keepdim=True)
                exp_CV = logits_CV.sub_(max_C1).exp_()  # in place: the chunk's only (C, V) fp32 buffer
                sum_exp_C1 = exp_CV.sum(dim=1, keepdim=True)
                loss_sum += (max_C1 + sum_exp_C1.log() - target_logit_C1).sum()
                if not (need_hidden_grad or need_weight_grad):
                    continue
                # d(scale · (lse - logit_t)) / d logits = scale · (softmax - one_hot(t))
                grad_logits_CV = exp_CV.mul_(scale / sum_exp_C1)
                grad_logits_CV.scatter_add_(1, targets_C1, (-scale * torch.ones_like(target_logit_C1)))
                grad_logits_CV = grad_logits_CV.to(compute_dtype)
                if need_hidden_grad:
                    grad_hidden_MD[start : start + chunk_size] = grad_logits_CV @ weight_c
                if need_weight_grad:
                    grad_weight_VD += grad_logits_CV.T @ hidden_CD
        ctx.save_for_backward(grad_hidden_MD, grad_weight_VD)
        ctx.weight_dtype = weight_VD.dtype
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_MD, grad_weight_VD = ctx.saved_tensors
        grad_hidden = None if grad_hidden_MD is None else grad_hidden_MD * grad_loss.to(grad_hidden_MD.dtype)
        grad_weight = None
        if grad_weight_VD is not None:
            grad_weight = grad_weight_VD.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_causal_lm_loss(
    hidden_BSD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    labels_BS: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kept_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(hidden @ weight.T, labels)`, without materialising the logits.

    Position s predicts label s+1; labels equal to `ignore_index` are skipped. With `num_items_in_batch` the loss is
    the sum over targets divided by it (gradient accumulation over tokens), else the mean over targets (NaN when
    there are none, as in `cross_entropy`). Under autocast the matmul runs in autocast's dtype and the softmax in fp32,
    as in the plain path. One host sync, to find the targets, unless `kept_positions` brings them: the host tensor
    `target_positions(labels_BS)` computed before the labels moved (`HostBatchLayout`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    B, S, D = hidden_BSD.shape
    if labels_BS.shape != (B, S):
        raise ValueError(f"labels have shape {tuple(labels_BS.shape)} but the hidden states are ({B}, {S}, {D})")
    targets_BS = F.pad(labels_BS[:, 1:], (0, 1), value=ignore_index).to(hidden_BSD.device)
    if kept_positions is None:  # what `target_positions` gives, from the targets already shifted: the host sync
        kept_M = (targets_BS.reshape(-1) != ignore_index).nonzero().squeeze(1)
    else:
        kept_M = host_to_device(kept_positions, hidden_BSD.device)
    hidden_MD = hidden_BSD.reshape(B * S, D).index_select(0, kept_M)
    targets_M = targets_BS.reshape(-1).index_select(0, kept_M)

    if num_items_in_batch is None:
        scale = 1.0 / kept_M.numel() if kept_M.numel() else float("nan")
    elif torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.to(hidden_BSD.device, torch.float32)
    else:
        scale = 1.0 / num_items_in_batch
    return _LinearCrossEntropy.apply(
        hidden_MD, lm_head_weight_VD, targets_M, scale, chunk_size, _compute_dtype(hidden_BSD), torch.is_grad_enabled()
    )


# (source grid size, device) -> (G(G+1)/2, source) fp32: row t(t-1)/2 + r holds the weights that resizing a line of
# `source` values to `t` values gives output r. Grows to the next power of two when a batch needs more.
_RESIZE_WEIGHT_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _first_row_of_target(target_size: torch.Tensor) -> torch.Tensor:
    return target_size * (target_size - 1) // 2


def resize_weight_table(source_size: int, max_target_size: int, device) -> torch.Tensor:
    """Rows of the 1-D bilinear antialiased resize matrices A_t (t × source), for every t up to `max_target_size`.

    They are read off `F.interpolate` itself, applied to the identity, so they are exactly the weights SigLIP2's own
    resize uses on this device; a 2-D resize is A_h @ grid @ A_w.T because the kernel's weights are separable.
    Memory is G²/2 · source · 4 bytes: 2 MiB for G = 256 and a 16-wide grid, 33 MiB for G = 1024. Compiled, a
    table already built is a lookup in the graph; building one breaks the graph.
    """
    table = _RESIZE_WEIGHT_TABLES.get((source_size, str(device)))
    if table is None or table.shape[0] < max_target_size * (max_target_size + 1) // 2:
        table = _build_resize_weight_table(source_size, max_target_size, device)
    return table


@torch.compiler.disable
def _build_resize_weight_table(source_size: int, max_target_size: int, device) -> torch.Tensor:
    G = 1 << max(0, max_target_size - 1).bit_length()
    # Channel c of the basis is one source row, constant along a width of 2 that is kept as it is: output
    # channel c, row r is A_t[r, c]. Not a width of 1: PyTorch's CPU kernel mis-resizes 1-wide images (every
    # output row gets the first row's weights).
    eye = torch.eye(source_size, device=device, dtype=torch.float32)
    basis = eye[None, :, :, None].expand(1, source_size, source_size, 2).contiguous()
    blocks = [
        F.interpolate(basis, size=(t, 2), mode="bilinear", align_corners=False, antialias=True)[0, :, :, 0].T
        for t in range(1, G + 1)
    ]
    table = _RESIZE_WEIGHT_TABLES[(source_size, str(device))] = torch.cat(blocks)
    return table


@torch.compiler.disable
def _build_table_before_embedding(embeddings: nn.Module, args: tuple, kwargs: dict) -> None:
    """A `Siglip2VisionEmbeddings` pre-hook: the table its resize needs, built before its forward reads a weight.

    A whole-model compile (DeepSpeed's DeepCompile, a user's `torch.compile(model)`) then breaks its graph here,
    instead of inside the resize, where the reshaped position-embedding weight is live and becomes the graph's
    output: DeepCompile releases a ZeRO-3 weight at the end of its graph, and the output is then empty.
    """
    pixel_values = args[0] if args else kwargs["pixel_values"]
    resize_weight_table(embeddings.position_embedding_size, pixel_values.shape[1], pixel_values.device)


def grouped_resize_positional_embeddings(
    positional_embeddings: torch.Tensor, spatial_shapes: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Drop-in for `Siglip2VisionEmbeddings.resize_positional_embeddings`: (H, W, D) grid -> (N, max_length, D).

    Image n's first h·w rows are the grid resized to its (h, w) (bilinear, antialiased, as transformers does) in
    raster order; the rest repeat its first row, as transformers pads. All images in one matmul, in fp32 whatever
    the autocast, cast back to the grid's dtype. No host sync. Shapes must be valid (the model checks them): h, w > 0
    and h·w <= max_length.
    """
    positional_embeddings_HWD = positional_embeddings
    H, W, D = positional_embeddings_HWD.shape
    device = positional_embeddings_HWD.device
    N = spatial_shapes.shape[0]
    table_h = resize_weight_table(H, max_length, device)
    table_w = table_h if W == H else resize_weight_table(W, max_length, device)

    heights_N1 = spatial_shapes[:, 0:1].to(device)
    widths_N1 = spatial_shapes[:, 1:2].to(device).clamp(min=1)
    position_1L = torch.arange(max_length, device=device)[None]
    valid_NL = position_1L < heights_N1 * widths_N1
    # Padding positions take row 0, column 0: the first resized embedding, which is what transformers pads with.
    rows_NL = torch.where(valid_NL, position_1L // widths_N1, 0)
    cols_NL = torch.where(valid_NL, position_1L % widths_N1, 0)
    weights_h_NLH = table_h[_first_row_of_target(heights_N1) + rows_NL]
    weights_w_NLW = table_w[_first_row_of_target(widths_N1) + cols_NL]
    weights_NLHW = weights_h_NLH[..., :, None] * weights_w_NLW[..., None, :]
    with torch.autocast(device.type, enabled=False):
        resized = weights_NLHW.reshape(N * max_length, H * W) @ positional_embeddings_HWD.float().reshape(H * W, D)
    return resized.reshape(N, max_length, D).to(positional_embeddings_HWD.dtype)


def use_grouped_position_embeddings(vision_tower: nn.Module, enabled: bool = True) -> int:
    """Make every SigLIP2 vision embedding in `vision_tower` resize with `grouped_resize_positional_embeddings`.

    Patches the instances, not the class, so other models in the process keep transformers' loop. `enabled=False`
    restores it. Returns how many embeddings were changed.
    """
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    embeddings = [module for module in vision_tower.modules() if isinstance(module, Siglip2VisionEmbeddings)]
    if not embeddings:
        raise ValueError(f"{type(vision_tower).__name__} holds no Siglip2VisionEmbeddings to patch")
    for module in embeddings:
        module.__dict__.pop("resize_positional_embeddings", None)
        hook = module.__dict__.pop("_build_table_hook", None)
        if hook is not None:
            hook.remove()
        if enabled:
            # An instance attribute shadows the class's staticmethod and, being a plain function, is not bound.
            module.resize_positional_embeddings = grouped_resize_positional_embeddings
            module._build_table_hook = module.register_forward_pre_hook(_build_table_before_embedding,
                                                                        with_kwargs=True)
    return len(embeddings)


def compile_layers(model: nn.Module, vision_shapes: str = "dynamic", trace_hooks: bool = True,
                   **compile_kwargs) -> int:
    """`torch.compile` each Llama decoder layer and SigLIP2 encoder layer in place; returns how many.

    Layers rather than the whole model: the repeated block is compiled once and reused, the Python between layers
    (masks, the image scatter with its host syncs) stays eager, and graph breaks there cost nothing. Packed decoder
    rows keep one shape, so the decoder stays static. The images' count N and padded length L change every batch,
    so the encoder layers must not compile one graph per shape; `vision_shapes` says how:

    - "dynamic": every dimension symbolic from the first call: one graph for any N and L.
    - "bucket": N symbolic (marked on the encoder's inputs before each call), L static: one graph per padded length,
      for batches whose L is padded to a few sizes (e.g. multiples of 256); padding costs encoder work, but the
      kernels see static lengths.
    - "static": every dimension static: one graph per input shape. For packed images (`use_packed_vision`), whose
      one dimension, the packed length, takes few values (`packed_patch_length`); flex attention's kernels then see
      static lengths. The recompile limit is raised to fit them.

    Decoder and encoder layers share transformers' `forward_with_checkpointing` frame, so they count against one
    `torch._dynamo.config.cache_size_limit` (8 by default): two graphs, plus one per bucket.

    `trace_hooks=False` compiles each layer's `forward` only and runs the layer's module hooks eagerly around it.
    For hooks dynamo should not trace: DeepSpeed ZeRO-3's, which break the graph and recompile per layer (with the
    layers as ZeRO-3 leaf modules, a layer then compiles whole). FSDP2's hooks are traced (the default).
    """
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.siglip2.modeling_siglip2 import Siglip2Encoder, Siglip2EncoderLayer

    if vision_shapes not in ("dynamic", "bucket", "static"):
        raise ValueError(f'vision_shapes must be "dynamic", "bucket" or "static", got {vision_shapes!r}')
    if vision_shapes == "static":
        # Up to 16 packed lengths per doubling of the patch count, and the decoder's graphs share the limit.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    count = 0

    def compile_layer(module, **kwargs):
        if trace_hooks:
            module.compile(**kwargs)  # the module's __call__, hooks included
        else:
            module.forward = torch.compile(module.forward, **kwargs)

    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer):
            compile_layer(module, **compile_kwargs)
        elif isinstance(module, Siglip2EncoderLayer):
            compile_layer(module, **{"dynamic": vision_shapes == "dynamic", **compile_kwargs})
        elif isinstance(module, Siglip2Encoder) and vision_shapes == "bucket":
            module.register_forward_pre_hook(_mark_image_count_dynamic, with_kwargs=True)
            continue
        else:
            continue
        count += 1
    return count


def _mark_image_count_dynamic(module, args, kwargs):
    """Before the (eager) encoder runs its compiled layers: dimension 0 of its inputs, the image count, is symbolic."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def use_decoder_attention(model: nn.Module, implementation: str) -> None:
    """Give the decoder its own attention backend (e.g. "flex_attention"), leaving the vision tower's as it is.

    SigLIP2 has no flex attention kernel in transformers, so one backend for the whole model cannot be flex. The
    decoder's flex path builds a block-sparse mask from packed `position_ids`, skipping the blocks across samples.
    """
    model.set_attn_implementation({"text_config": implementation})


# ----------------------------------------------------------------------------------------------------------------------
# Packed vision: every image's valid patches in one sequence, with no padding patches.

PACKED_VISION_ATTENTION = "llama3_siglip2_packed_vision"
# flex attention's block: a packed length is a multiple of it, so no block is partly out of range.
PACKED_BLOCK = 128


def packed_vision_attention(module, query, key, value, attention_mask, **kwargs):
    """SigLIP2's attention for packed images: flex attention given a `BlockMask` (a GPU skips the blocks between
    images), transformers' sdpa for any other mask (the padded layout, and packed images on the CPU)."""
    if isinstance(attention_mask, BlockMask):
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def sdpa_mask_without_read(*args, allow_is_bidirectional_skip: bool = False, **kwargs):
    """transformers' sdpa mask for the vision tower, always built. To skip it when no patch is padding, transformers
    reads the padding mask back (`padding_mask.all()`): a host sync in every forward. NaFlex batches pad nearly always,
    so the mask is built anyway; building it unread gives the same attention."""
    return sdpa_mask(*args, allow_is_bidirectional_skip=False, **kwargs)


# Registered under their own names, so that other models in the process keep transformers' "sdpa". Padded calls of
# the vision tower (`get_image_features`, and training forwards without packing) build sdpa's mask, unread.
VISION_ATTENTION = "llama3_siglip2_vision"
AttentionInterface.register(VISION_ATTENTION, sdpa_attention_forward)
AttentionMaskInterface.register(VISION_ATTENTION, sdpa_mask_without_read)
AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)
AttentionMaskInterface.register(PACKED_VISION_ATTENTION, sdpa_mask_without_read)


def _vlm_models(model: nn.Module) -> list[nn.Module]:
    """Every Llama3Siglip2Model in `model` (itself, inside the LM, or under PEFT's wrappers)."""
    targets = [module for module in model.modules() if hasattr(module, "pack_image_patches")]
    if not targets:
        raise ValueError(f"{type(model).__name__} holds no Llama3Siglip2Model")
    return targets


def use_vision_attention(model: nn.Module, name: str = VISION_ATTENTION) -> int:
    """Set the vision tower's attention of every Llama3Siglip2Model in `model` (`VISION_ATTENTION`: sdpa with its mask
    built unread; "sdpa" restores transformers' own); returns how many models changed."""
    targets = _vlm_models(model)
    for module in targets:
        module.vision_tower.set_attn_implementation(name)
    return len(targets)


def packed_patch_length(total_patches: int) -> int:
    """The length a packed sequence of `total_patches` is padded to: a multiple of 2^(bits - 4) and of
    `PACKED_BLOCK`. At most an eighth more work (plus one block) and at most 16 lengths per doubling of the total,
    so layers compiled for static shapes make a bounded number of graphs."""
    granule = max(PACKED_BLOCK, 1 << max(0, total_patches.bit_length() - 4))
    return max(granule, -(-total_patches // granule) * granule)


@dataclass
class PackedPatchLayout:
    """Where each image's patches sit in the packed sequence, built on the host (no device read).

    `source_index` (M,): for each packed position, its flat index into the padded (N·L) patches (padding positions
    repeat patch 0). `document_ids` (M,): the image each position belongs to; padding positions form document N.
    `image_starts`: the packed offset of each image's first patch."""

    source_index: torch.Tensor
    document_ids: torch.Tensor
    image_starts: list[int]

    @classmethod
    def from_shapes(cls, spatial_shapes: list[tuple[int, int]], max_patches: int) -> "PackedPatchLayout":
        lengths = torch.tensor([h * w for h, w in spatial_shapes], dtype=torch.long)
        total = int(lengths.sum())
        padded = packed_patch_length(total)
        starts = torch.cumsum(lengths, 0) - lengths
        document_ids = torch.full((padded,), len(spatial_shapes), dtype=torch.int32)
        source_index = torch.zeros(padded, dtype=torch.long)
        document_ids[:total] = torch.repeat_interleave(torch.arange(len(spatial_shapes), dtype=torch.int32), lengths)
        within_image = torch.arange(total) - torch.repeat_interleave(starts, lengths)
        source_index[:total] = document_ids[:total].long() * max_patches + within_image
        return cls(source_index, document_ids, starts.tolist())


def packed_attention_mask(document_ids_M: torch.Tensor):
    """Attention within each document of the packed sequence: a flex `BlockMask` on a GPU, else a dense (1, 1, M, M)
    boolean mask for sdpa."""
    if document_ids_M.device.type == "cuda":
        return document_block_mask(document_ids_M[None], causal=False)
    return (document_ids_M[:, None] == document_ids_M[None, :])[None, None]


def document_block_mask(document_ids_BS: torch.Tensor, causal: bool, block_size: int = PACKED_BLOCK) -> BlockMask:
    """Flex attention's `BlockMask` for rows of whole documents: a token attends to the tokens of its own document
    (and, if `causal`, only to earlier ones).

    Document ids must not decrease along a row (packed samples, one after another), and S must be a multiple of
    `block_size`. Then the first and last id of each block say which block pairs meet a document (partial) and
    which lie inside one document (full), on (S/block)² booleans: no (S × S) evaluation of the mask, as
    `create_block_mask` makes, and no host sync. The mask function is applied only inside partial blocks.
    """
    B, S = document_ids_BS.shape
    if S % block_size:
        raise ValueError(f"rows of {S} tokens are not a whole number of {block_size}-token blocks")
    blocks = document_ids_BS.view(B, S // block_size, block_size)
    first, last = blocks[..., 0], blocks[..., -1]
    q_first, q_last, kv_first, kv_last = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    meets = (kv_last >= q_first) & (kv_first <= q_last)
    inside_one = (q_first == q_last) & (kv_first == kv_last) & (q_first == kv_first)
    if causal:
        index = torch.arange(S // block_size, device=document_ids_BS.device)
        meets &= index[:, None] >= index[None, :]
        inside_one &= index[:, None] > index[None, :]  # diagonal blocks are causal inside: partial

    def ordered(blocks_BQK):
        """(count, indices) per query block, indices of the blocks it needs first: flex's sparse layout."""
        indices = torch.argsort(blocks_BQK.int(), dim=-1, descending=True, stable=True).int()
        return blocks_BQK.sum(-1, dtype=torch.int32)[:, None], indices[:, None]

    def same_document(batch, head, q_index, kv_index):
        same = document_ids_BS[batch, q_index] == document_ids_BS[batch, kv_index]
        return same & (q_index >= kv_index) if causal else same

    return BlockMask.from_kv_blocks(*ordered(meets & ~inside_one), *ordered(inside_one), BLOCK_SIZE=block_size,
                                    mask_mod=same_document, seq_lengths=(S, S))


def packed_causal_block_mask(position_ids_BS: torch.Tensor) -> BlockMask:
    """The decoder's mask for packed rows as a flex `BlockMask`: causal within each sample, where a sample starts
    wherever the position does not follow the one before (transformers' `find_packed_sequence_indices`)."""
    previous = torch.cat([position_ids_BS[:, :1] - 1, position_ids_BS[:, :-1]], dim=-1)
    return document_block_mask((position_ids_BS - previous != 1).cumsum(-1), causal=True)


def use_packed_vision(model: nn.Module, enabled: bool = True) -> int:
    """Encode images packed (see `PackedPatchLayout`) in training forwards of `model`; returns how many models changed.

    The vision tower then attends through `packed_vision_attention`: flex over a block-diagonal mask on a GPU, so
    neither padding patches nor attention across images cost work. `get_image_features` keeps the padded layout,
    whose per-image hidden states it returns. Layers compiled with `compile_layers(vision_shapes="static")` make one
    graph per packed length (`packed_patch_length` bounds them). `enabled=False` restores the padded path and sdpa.
    """
    targets = _vlm_models(model)
    for module in targets:
        module.pack_image_patches = enabled
        module.vision_tower.set_attn_implementation(PACKED_VISION_ATTENTION if enabled else "sdpa")
    return len(targets)


__all__ = [
    "PACKED_VISION_ATTENTION",
    "VISION_ATTENTION",
    "PackedPatchLayout",
    "chunked_causal_lm_loss",
    "compile_layers",
    "document_block_mask",
    "grouped_resize_positional_embeddings",
    "packed_attention_mask",
    "packed_causal_block_mask",
    "packed_patch_length",
    "packed_vision_attention",
    "resize_weight_table",
    "use_decoder_attention",
    "use_grouped_position_embeddings",
    "use_packed_vision",
    "use_vision_attention",
]
