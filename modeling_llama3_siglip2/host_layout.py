"""The batch's data-dependent sizes, read on the host before the batch moves to the GPU.

A training forward needs three things on the host that depend on the data: each image's patch grid (to merge its
patches and lay out packed images), the positions of the image placeholders (to scatter the image tokens into the
text), and the positions that have a target (the chunked loss computes logits for those only). Read from GPU
tensors, each read is a host sync: the host stops queueing work until the GPU has caught up, so it can no longer run
ahead, and its slow stretches (FSDP2's hooks in the backward, a late rank) turn into GPU idle time. The collator
built all three on the host, so a training loop computes them there (`HostBatchLayout.of(batch, config)`, before
`batch.to(device)`) and hands them to the model for one call:

    with model.host_layout(HostBatchLayout.of(batch, model.config)):
        loss = model(**batch.to(device)).loss

The layout is checked against the batch it is used with (token and image counts). Without a layout the model reads
the GPU as before: one sync for the images, one for the targets. It travels beside the model, not as an argument,
because FSDP2 and DDP move every tensor argument to the GPU before the forward sees it.

Hub-travelling: imports only torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@torch.compiler.disable  # a whole-model compile (DeepCompile) cannot trace pinning; the copy stays eager
def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a pageable copy to a GPU first drains its queue."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it until copied


def check_image_grids(stats_N3: list[list[int]], max_patches: int, merge_size: int) -> list[tuple[int, int]]:
    """(h, w) per image from rows of (h, w, valid patches); a clear error for a grid that cannot be right."""
    for i, (h, w, valid) in enumerate(stats_N3):
        if h * w != valid or h * w > max_patches:
            raise ValueError(f"image {i}: spatial_shapes {h}×{w} disagrees with its {valid} valid patches "
                             f"(L={max_patches})")
        if h % merge_size or w % merge_size:
            raise ValueError(f"image {i}: a {h}×{w} patch grid cannot be merged in {merge_size}×{merge_size} blocks")
    return [(h, w) for h, w, _ in stats_N3]


def mask_never_targets(labels_BS: torch.Tensor, config) -> torch.Tensor:
    """The labels with the image placeholder, `<boi>` and `<eoi>` ids replaced by `config.ignore_index`: the images
    come from the user, and the model is not taught to emit them."""
    # Compared one id at a time: a tensor of the ids made here would be a host-to-device copy, a host sync.
    never = (labels_BS == config.image_token_id) | (labels_BS == config.boi_token_id)
    return labels_BS.masked_fill(never | (labels_BS == config.eoi_token_id), config.ignore_index)


def count_targets(labels_BS: torch.Tensor, config) -> torch.Tensor:
    """How many positions the shifted loss scores, as a 0-dim tensor on the labels' device (no host sync): each label
    after its row's first that is neither `config.ignore_index` nor an image id. The `num_items_in_batch` that makes a
    sum over tokens a mean; counting the image ids as well would make every such loss too small."""
    return (mask_never_targets(labels_BS, config)[:, 1:] != config.ignore_index).sum()


def target_positions(labels_BS: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat positions (into B·S) whose next token is a target: position s predicts label s+1."""
    targets_BS = F.pad(labels_BS[:, 1:], (0, 1), value=ignore_index)
    return (targets_BS.reshape(-1) != ignore_index).nonzero().squeeze(1)


class HostBatchLayout:
    """A batch's image grids, placeholder positions and target positions, as host tensors and lists."""

    def __init__(self, tokens_shape: tuple[int, int], image_shapes: list[tuple[int, int]] | None,
                 placeholder_positions: torch.Tensor | None, target_positions: torch.Tensor | None):
        self.tokens_shape = tuple(tokens_shape)
        self.image_shapes = image_shapes
        self.placeholder_positions = placeholder_positions
        self.target_positions = target_positions

    @classmethod
    def of(cls, batch: Mapping[str, torch.Tensor], config) -> HostBatchLayout:
        """From a collated batch still on the host (`input_ids`, optional `labels` and the NaFlex pixel keys)."""
        input_ids = batch["input_ids"]
        for key in ("input_ids", "labels", "spatial_shapes", "pixel_attention_mask"):
            value = batch.get(key)
            if value is not None and value.device.type != "cpu":
                raise ValueError(f"HostBatchLayout.of reads the batch on the host, but {key} is on {value.device}: "
                                 "build the layout before moving the batch")
        image_shapes = placeholders = None
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] > 0:
            stats = torch.cat([batch["spatial_shapes"], batch["pixel_attention_mask"].sum(-1, keepdim=True)], -1)
            image_shapes = check_image_grids(stats.tolist(), pixel_values.shape[1], config.spatial_merge_size)
            placeholders = (input_ids.reshape(-1) == config.image_token_id).nonzero().squeeze(1)
        labels = batch.get("labels")
        targets = None
        if labels is not None:
            targets = target_positions(mask_never_targets(labels, config), config.ignore_index)
        return cls(tuple(input_ids.shape), image_shapes, placeholders, targets)

    def check_fits(self, input_ids: torch.Tensor | None, images: int) -> None:
        """Raise unless this layout was made for a batch of these tokens and this many images."""
        tokens_shape = None if input_ids is None else tuple(input_ids.shape)
        layout_images = len(self.image_shapes or ())
        if tokens_shape != self.tokens_shape or images != layout_images:
            raise ValueError(f"the host layout was made for {self.tokens_shape} tokens and {layout_images} images, "
                             f"but the forward got {tokens_shape} tokens and {images} images: build it from the "
                             "batch it is used with")
