"""Packed images (`efficient_ops.use_packed_vision`) compute what the padded NaFlex layout computes.

The reference is the model's padded path, which is transformers' `Siglip2VisionModel` called as it is (the parity
tests in test_modeling.py hold it to transformers). Packed, the same SigLIP2 modules run over one sequence of every
image's valid patches, attention kept within each image: a dense block-diagonal mask for sdpa on the CPU, a flex
`BlockMask` on a GPU (whose forward also runs here, on the CPU, against the dense mask).
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from modeling_llama3_siglip2.efficient_ops import (
    PACKED_BLOCK,
    PACKED_VISION_ATTENTION,
    PackedPatchLayout,
    compile_layers,
    packed_attention_mask,
    packed_patch_length,
    use_packed_vision,
)

from .test_modeling import naflex_batch, sequence_with_images, text_ids


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1 << 20))
def test_packed_length_pads_little_and_takes_few_values(total):
    length = packed_patch_length(total)
    assert length >= total and length % PACKED_BLOCK == 0
    assert length - total < max(PACKED_BLOCK, total / 8 + 1)
    # Every total in the same doubling [2^b, 2^(b+1)) lands on one of at most 16 lengths.
    low = 1 << (total.bit_length() - 1)
    granule = max(PACKED_BLOCK, 1 << max(0, total.bit_length() - 4))
    assert (packed_patch_length(2 * low - 1) - packed_patch_length(low)) // granule < 16


def test_layout_lists_each_images_valid_patches_in_order():
    layout = PackedPatchLayout.from_shapes([(2, 3), (1, 1), (4, 2)], max_patches=10)
    assert layout.image_starts == [0, 6, 7]
    assert layout.source_index[:15].tolist() == [0, 1, 2, 3, 4, 5, 10, 20, 21, 22, 23, 24, 25, 26, 27]
    assert layout.document_ids[:15].tolist() == [0] * 6 + [1] + [2] * 8
    assert len(layout.document_ids) == PACKED_BLOCK and set(layout.document_ids[15:].tolist()) == {3}


def images_and_text(model, shapes, seed):
    """Two packed text rows whose placeholders receive `shapes`' image tokens, with labels."""
    k = model.config.spatial_merge_size
    counts = [(h // k) * (w // k) for h, w in shapes]
    pixel_values, mask, spatial_shapes = naflex_batch(shapes, 64, model.config.vision_config.patch_size, seed=seed)
    half = len(shapes) // 2
    rows = [
        sequence_with_images(model.config, [text_ids(5, seed + i) for i in range(len(part) + 1)], part)
        for part in (counts[:half], counts[half:])
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return {"input_ids": input_ids, "pixel_values": pixel_values, "pixel_attention_mask": mask,
            "spatial_shapes": spatial_shapes, "labels": input_ids.clone()}


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixture", ["built", "built_merge2"])
def test_packed_images_give_the_padded_loss_logits_and_gradients(fixture, request):
    model = copy.deepcopy(request.getfixturevalue(fixture)[0]).train()
    k = model.config.spatial_merge_size
    shapes = [(8, 8), (2 * k, 6 * k), (k, k), (6, 4), (4, 2 * k)]
    batch = images_and_text(model, shapes, seed=3)
    padded_loss, padded_grads = loss_and_gradients(model, batch)
    with torch.no_grad():
        padded_logits = model(**batch).logits
    assert use_packed_vision(model) == 1
    assert model.model.vision_tower.config._attn_implementation == PACKED_VISION_ATTENTION
    packed_loss, packed_grads = loss_and_gradients(model, batch)
    with torch.no_grad():
        packed_logits = model(**batch).logits
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_logits, padded_logits, rtol=1e-4, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert any("vision_tower" in name for name in packed_grads)
    for name, want in padded_grads.items():
        error = (packed_grads[name] - want).norm()
        assert error <= 1e-4 * want.norm() + 1e-7, f"{name}: error {error:.2e} against a norm of {want.norm():.2e}"


def test_packed_images_with_a_text_only_batch_and_back(built):
    """A text-only training batch still runs the (packed) image modules; turning packing off restores sdpa and the
    padded path, whose per-image hidden states `get_image_features` returns in either mode."""
    model = copy.deepcopy(built[0]).train()
    use_packed_vision(model)
    ids = torch.tensor([text_ids(12, 1)])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.model.vision_tower.parameters())
    pixel_values, mask, spatial_shapes = naflex_batch([(4, 4), (2, 6)], 64, model.config.vision_config.patch_size)
    features = model.get_image_features(pixel_values, mask, spatial_shapes)
    assert features.last_hidden_state.shape[:2] == (2, 64) and [t.shape[0] for t in features.pooler_output] == [16, 12]
    use_packed_vision(model, enabled=False)
    assert model.model.pack_image_patches is False
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="holds no Llama3Siglip2Model"):
        use_packed_vision(torch.nn.Linear(2, 2))


def test_flex_block_mask_gives_the_dense_masks_encoder_output(built):
    """The GPU's mask (a flex BlockMask) against the CPU's (dense), through SigLIP2's encoder, forward only: flex
    attention has no CPU backward. Documents straddle flex's 128-blocks, and padding is a document of its own."""
    # transformers compiles flex attention; a graph made dynamic by another test's shapes hits a bug in
    # Inductor's CPU flex template (undeclared `cur_qSplitSize8`), so each CPU flex test starts from no graphs.
    torch._dynamo.reset()
    model = copy.deepcopy(built[0]).eval()
    use_packed_vision(model)
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    layout = PackedPatchLayout.from_shapes([(10, 10), (6, 10), (12, 8)], max_patches=128)
    document_ids = layout.document_ids
    length = document_ids.shape[0]
    assert length == 2 * PACKED_BLOCK
    block_mask = create_block_mask(lambda b, h, q, kv: document_ids[q] == document_ids[kv], None, None, length, length,
                                   device="cpu")
    hidden = torch.randn(1, length, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = encoder(inputs_embeds=hidden, attention_mask=packed_attention_mask(document_ids)).last_hidden_state
        flex = encoder(inputs_embeds=hidden, attention_mask=block_mask).last_hidden_state
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)


def test_static_compiled_encoder_makes_one_graph_per_packed_length(built):
    """Batches whose images differ but whose packed length is the same reuse the encoder's graph."""
    model = copy.deepcopy(built[0]).eval()
    use_packed_vision(model)
    encoder_graphs = []

    def recording_backend(graph_module, example_inputs):
        if any("layer_norm" in str(node.target) for node in graph_module.graph.nodes):
            encoder_graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compile_layers(model, vision_shapes="static", backend=recording_backend)
    for shapes in ([(8, 8), (4, 4)], [(6, 6), (2, 10), (4, 2)], [(4, 4)] * 5, [(8, 8), (6, 8)]):
        assert packed_patch_length(sum(h * w for h, w in shapes)) == PACKED_BLOCK
        batch = images_and_text(model, shapes, seed=len(shapes))
        batch.pop("labels")
        with torch.no_grad():
            model(**batch)
    assert len(encoder_graphs) == 1
    torch._dynamo.reset()
