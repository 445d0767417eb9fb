"""Each optimisation in `efficient_ops` computes what the plain transformers path computes, values and gradients.

The references are transformers' own: `ForCausalLMLoss` on full logits, `Siglip2VisionEmbeddings.resize_positional_
embeddings`, and an unpatched `Siglip2VisionModel` with the same weights.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Siglip2VisionConfig, Siglip2VisionModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from modeling_llama3_siglip2.efficient_ops import (
    chunked_causal_lm_loss,
    compile_layers,
    grouped_resize_positional_embeddings,
    use_decoder_attention,
    use_grouped_position_embeddings,
)

IGNORE = -100


def plain_loss(hidden_BSD, weight_VD, labels_BS, num_items_in_batch=None):
    logits = F.linear(hidden_BSD, weight_VD)
    return ForCausalLMLoss(logits, labels_BS, vocab_size=weight_VD.shape[0], num_items_in_batch=num_items_in_batch)


def loss_and_grads(loss_fn, hidden_BSD, weight_VD, *args, **kwargs):
    hidden_BSD = hidden_BSD.detach().requires_grad_()
    weight_VD = weight_VD.detach().requires_grad_()
    loss = loss_fn(hidden_BSD, weight_VD, *args, **kwargs)
    loss.backward()
    return loss.detach(), hidden_BSD.grad, weight_VD.grad


def random_labels(B, S, V, ignored_fraction, generator):
    labels = torch.randint(0, V, (B, S), generator=generator)
    ignored = torch.rand((B, S), generator=generator) < ignored_fraction
    return labels.masked_fill(ignored, IGNORE)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    S=st.integers(2, 40),
    V=st.integers(2, 70),
    chunk_size=st.integers(1, 50),
    ignored_fraction=st.sampled_from([0.0, 0.3, 0.8]),
    num_items=st.sampled_from([None, "int", "tensor"]),
    seed=st.integers(0, 2**16),
)
def test_chunked_loss_matches_transformers_loss_and_gradients(B, S, V, chunk_size, ignored_fraction, num_items, seed):
    generator = torch.Generator().manual_seed(seed)
    D = 8
    hidden = torch.randn(B, S, D, generator=generator)
    weight = torch.randn(V, D, generator=generator)
    labels = random_labels(B, S, V, ignored_fraction, generator)
    labels[0, 1] = 0  # at least one target, so that the mean is defined
    num_items_in_batch = {None: None, "int": 37, "tensor": torch.tensor(37)}[num_items]

    expected = loss_and_grads(plain_loss, hidden, weight, labels, num_items_in_batch)
    got = loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, num_items_in_batch, chunk_size=chunk_size)
    for name, want, have in zip(("loss", "grad hidden", "grad weight"), expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    """Under autocast both run the matmul in bf16 and the softmax in fp32, so they agree to bf16 rounding."""
    generator = torch.Generator().manual_seed(0)
    B, S, D, V = 2, 96, 32, 300
    hidden = torch.randn(B, S, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) * 0.2
    labels = random_labels(B, S, V, 0.5, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain_loss, hidden, weight, labels)
        got = loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_size=17)
    assert got[2].dtype == torch.float32, "the weight's gradient comes back in the weight's own dtype"
    for name, want, have in zip(("loss", "grad hidden", "grad weight"), expected, got):
        relative = (have - want).norm() / want.norm()
        assert relative < 5e-3, f"{name}: relative error {relative:.2e} is beyond bf16 rounding"


def test_chunked_loss_without_targets_is_nan_as_a_mean_and_zero_as_a_sum():
    hidden, weight = torch.randn(1, 5, 4), torch.randn(7, 4)
    labels = torch.full((1, 5), IGNORE)
    labels[0, 0] = 3  # the first label is never a target: nothing predicts it
    assert torch.isnan(plain_loss(hidden, weight, labels)) and torch.isnan(chunked_causal_lm_loss(hidden, weight, labels))
    loss, grad_hidden, grad_weight = loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, 4)
    assert loss == 0 and not grad_hidden.any() and not grad_weight.any()


def test_chunked_loss_skips_gradients_it_is_not_asked_for():
    """With the head frozen (LoRA, say) the loss still trains the hidden states, and leaves the weight alone."""
    hidden = torch.randn(1, 9, 4, requires_grad=True)
    weight = torch.randn(7, 4)
    labels = torch.randint(0, 7, (1, 9))
    chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4).backward()
    expected_hidden = hidden.detach().requires_grad_()
    plain_loss(expected_hidden, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, expected_hidden.grad)
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, weight, labels), plain_loss(hidden, weight, labels))


def reference_resize(grid_HWD, spatial_shapes_N2, max_length):
    return Siglip2VisionEmbeddings.resize_positional_embeddings(grid_HWD, spatial_shapes_N2, max_length)


# Width >= 2: PyTorch's CPU antialiased kernel mis-resizes to a width of 1 (see the test after this one).
image_shape = st.tuples(st.integers(1, 40), st.integers(2, 40)).filter(lambda hw: hw[0] * hw[1] <= 300)


@settings(max_examples=25, deadline=None)
@given(
    # Square grids only: the config requires one (SigLIP2's num_patches is a square), and transformers 5.24's own
    # resize, the reference here, assumes it.
    grid=st.sampled_from([(16, 16), (8, 8), (5, 5)]),
    shapes=st.lists(image_shape, min_size=1, max_size=6),
    repeats=st.integers(1, 3),
    padding=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_grouped_resize_matches_transformers_resize_and_its_gradient(grid, shapes, repeats, padding, seed):
    """Repeated shapes, padding positions past h·w, grids of several sizes: the same values and gradients."""
    generator = torch.Generator().manual_seed(seed)
    H, W = grid
    grid_HWD = torch.randn(H, W, 24, generator=generator, requires_grad=True)
    spatial_shapes = torch.tensor(shapes * repeats)
    max_length = max(h * w for h, w in shapes) + padding

    expected = reference_resize(grid_HWD, spatial_shapes, max_length)
    got = grouped_resize_positional_embeddings(grid_HWD, spatial_shapes, max_length)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    upstream = torch.randn(expected.shape, generator=generator)
    (expected_grad,) = torch.autograd.grad(expected, grid_HWD, upstream)
    (got_grad,) = torch.autograd.grad(got, grid_HWD, upstream)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-4)


def test_one_patch_wide_images_get_the_transposed_resize():
    """A (h, 1) image gets the transpose of the (1, h) resize of the transposed grid, as bilinear resizing must.

    transformers' own loop does not on the CPU: `F.interpolate(antialias=True)` to a width of 1 gives every output row
    the first row's weights there. So this reference transposes, keeping the kernel off width-1 outputs.
    """
    grid_HWD = torch.randn(16, 16, 12)
    heights = [2, 5, 16, 37]
    got = grouped_resize_positional_embeddings(grid_HWD, torch.tensor([[h, 1] for h in heights]), 40)
    for n, h in enumerate(heights):
        transposed = reference_resize(grid_HWD.transpose(0, 1), torch.tensor([[1, h]]), h)[0]
        torch.testing.assert_close(got[n, :h], transposed, rtol=1e-5, atol=1e-5)


def tiny_vision_tower(seed=0):
    torch.manual_seed(seed)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 patch_size=4, num_patches=64, vision_use_head=False)
    return Siglip2VisionModel(config).train()


def naflex_batch(shapes, L, generator):
    pixel_values = torch.randn(len(shapes), L, 3 * 4 * 4, generator=generator)
    mask = torch.zeros(len(shapes), L, dtype=torch.long)
    for n, (h, w) in enumerate(shapes):
        mask[n, : h * w] = 1
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(shapes))


def test_vision_tower_with_grouped_position_embeddings_matches_the_unpatched_tower():
    generator = torch.Generator().manual_seed(3)
    batch = naflex_batch([(8, 8), (3, 12), (8, 8), (10, 2), (5, 5)], 64, generator)
    valid = batch["pixel_attention_mask"].bool()
    # Not a sum of squares: after the final LayerNorm that is nearly constant, and its gradients are rounding noise.
    upstream = torch.randn(int(valid.sum()), 32, generator=generator)
    outputs, grads = [], []
    for patched in (False, True):
        tower = tiny_vision_tower()
        if patched:
            assert use_grouped_position_embeddings(tower) == 1
        hidden = tower(**batch).last_hidden_state
        (hidden[valid] * upstream).sum().backward()
        outputs.append(hidden[valid].detach())
        grads.append({name: p.grad for name, p in tower.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    # fp32 sums in another order: compare whole tensors, as elements near zero have no relative precision. The floor,
    # relative to all gradients, is for the key biases, whose true gradient is zero (softmax ignores a shift of all
    # keys), so what they get is rounding noise.
    floor = 1e-6 * torch.cat([g.flatten() for g in grads[0].values()]).norm()
    for name, want in grads[0].items():
        error = (grads[1][name] - want).norm()
        assert error <= 1e-5 * want.norm() + floor, f"{name}: error {error:.2e} against a norm of {want.norm():.2e}"


def test_a_whole_compiled_tower_returns_no_view_of_a_weight_from_any_graph():
    """DeepSpeed's DeepCompile releases each ZeRO-3 weight at the end of the graph that used it, so a graph that
    returns a view of a weight hands the next graph an empty tensor. SigLIP2's position grid is such a view; the
    resize table is therefore built in a hook before the embedding's forward (the graph breaks there), and read
    inside the graph once built. Caught on 2 H200s: "(16, 16, 0) (actual) vs (16, 16, 768) (expected)"."""
    from modeling_llama3_siglip2 import efficient_ops

    tower = tiny_vision_tower()
    use_grouped_position_embeddings(tower)
    weights = {p.untyped_storage().data_ptr(): name for name, p in tower.named_parameters()}
    returned_weights, graphs = [], []

    def weight_checking_backend(graph_module, example_inputs):
        graphs.append(graph_module)

        def run(*args):
            outputs = graph_module(*args)
            returned_weights.extend(weights[o.untyped_storage().data_ptr()] for o in outputs
                                    if torch.is_tensor(o) and o.untyped_storage().data_ptr() in weights)
            return outputs
        return run

    torch._dynamo.reset()
    efficient_ops._RESIZE_WEIGHT_TABLES.clear()  # the first call builds the table, as in a fresh process
    compiled = torch.compile(tower, backend=weight_checking_backend)
    generator = torch.Generator().manual_seed(0)
    for shapes, L in (([(4, 4), (2, 6)], 16), ([(8, 8), (3, 12), (5, 5)], 64)):
        batch = naflex_batch(shapes, L, generator)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**batch).last_hidden_state, tower(**batch).last_hidden_state)
    assert graphs, "nothing was compiled"
    assert returned_weights == [], f"graphs returned views of {sorted(set(returned_weights))}"


def test_use_grouped_position_embeddings_can_be_undone_and_refuses_a_model_without_siglip2():
    tower = tiny_vision_tower()
    use_grouped_position_embeddings(tower)
    use_grouped_position_embeddings(tower)  # twice: still one table-building hook
    assert tower.embeddings.resize_positional_embeddings is grouped_resize_positional_embeddings
    assert len(tower.embeddings._forward_pre_hooks) == 1
    use_grouped_position_embeddings(tower, enabled=False)
    assert tower.embeddings.resize_positional_embeddings == Siglip2VisionEmbeddings.resize_positional_embeddings
    assert len(tower.embeddings._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="no Siglip2VisionEmbeddings"):
        use_grouped_position_embeddings(torch.nn.Linear(2, 2))


def test_decoder_attention_changes_the_decoder_only(built):
    model, _ = built
    try:
        use_decoder_attention(model, "eager")
        assert model.model.language_model.config._attn_implementation == "eager"
        assert model.model.vision_tower.config._attn_implementation == "sdpa"
    finally:
        use_decoder_attention(model, "sdpa")


def compile_and_compare(model, trace_hooks: bool = True, hook=None) -> tuple[list, int]:
    """Compile a copy of `model`'s layers to a backend that runs the traced graphs (tracing, not codegen), with `hook`
    registered on every layer afterwards, and check one forward against the eager model: (the graphs dynamo made,
    the number of layers compiled)."""
    from modeling_llama3_siglip2 import Llama3Siglip2ForConditionalGeneration

    compiled = Llama3Siglip2ForConditionalGeneration(model.config).eval()
    compiled.load_state_dict(model.state_dict())
    graphs, hook_calls = [], []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    layers = compile_layers(compiled, trace_hooks=trace_hooks, backend=recording_backend)
    if hook is not None:
        for module in compiled.modules():
            if type(module).__name__ in ("LlamaDecoderLayer", "Siglip2EncoderLayer"):
                module.register_forward_pre_hook(lambda module, args: hook(hook_calls, args))
    generator = torch.Generator().manual_seed(0)
    image = naflex_batch([(4, 4)], 16, generator)
    input_ids = torch.randint(0, 200, (1, 30), generator=generator)
    input_ids[0, 3:19] = model.config.image_token_id
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=input_ids, **image).logits,
                                   model(input_ids=input_ids, **image).logits)
    assert len(hook_calls) == (layers if hook is not None else 0)  # a hook runs on every layer call
    return graphs, layers


def test_compiled_layers_compute_what_the_eager_layers_compute(built):
    """Both towers' layers go through dynamo."""
    model, _ = built
    graphs, layers = compile_and_compare(model)
    assert layers == model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    traced = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert any("silu" in op for op in traced), "no Llama layer was traced"
    assert any("layer_norm" in op for op in traced), "no SigLIP2 layer was traced"


def test_layers_compiled_without_their_hooks_run_the_hooks_eagerly_around_whole_graphs(built):
    """ZeRO-3 compiles with `trace_hooks=False`: its hooks on each layer break the graph when traced. A hook that
    cannot be traced stands in for them. Traced, it adds graphs (the control); left eager, the layers compile to the
    graphs they make with no hook at all, and the hook still runs on every layer call."""
    model, _ = built

    def untraceable(calls, args):  # a reduction dynamo traces, then a read back to Python it cannot
        calls.append(float(args[0].float().abs().sum()))

    def graph_count(trace_hooks, hook):
        return len(compile_and_compare(model, trace_hooks, hook)[0])

    plain = graph_count(trace_hooks=True, hook=None)
    assert graph_count(trace_hooks=True, hook=untraceable) > plain
    assert graph_count(trace_hooks=False, hook=untraceable) == plain
    assert graph_count(trace_hooks=False, hook=None) == plain


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.lists(st.integers(1, 300), min_size=1, max_size=40), st.booleans())
def test_document_block_mask_has_create_block_masks_blocks(blocks, B, sample_lengths, causal):
    """Block summaries against flex's own builder, which evaluates the mask at every position."""
    from torch.nn.attention.flex_attention import create_block_mask

    from modeling_llama3_siglip2.efficient_ops import document_block_mask

    S = 128 * blocks
    rows = []
    for b in range(B):  # each row its own rotation of the sample lengths; ids repeat nothing across rows
        lengths = sample_lengths[b % len(sample_lengths):] + sample_lengths[: b % len(sample_lengths)]
        row = [doc for doc, n in enumerate(lengths * (S // sum(lengths) + 1)) for _ in range(n)]
        rows.append(row[:S])
    ids = torch.tensor(rows)
    ours = document_block_mask(ids, causal=causal)

    def reference_mod(b, h, q, kv):
        same = ids[b, q] == ids[b, kv]
        return same & (q >= kv) if causal else same

    reference = create_block_mask(reference_mod, B, None, S, S, device="cpu")
    assert torch.equal(ours.to_dense(), reference.to_dense())
    assert torch.equal(ours.kv_num_blocks, reference.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks)
    q, kv = torch.arange(S)[:, None], torch.arange(S)[None, :]
    for b in range(B):
        assert torch.equal(ours.mask_mod(torch.tensor(b), torch.tensor(0), q, kv), reference_mod(b, 0, q, kv))


def test_flex_decoder_gets_our_packed_mask_and_transformers_output(built):
    """Packed rows with a flex decoder: the model passes `packed_causal_block_mask`, and the decoder's output is the
    one it gives with the mask transformers builds (flex forward on the CPU)."""
    import copy

    from torch.nn.attention.flex_attention import BlockMask

    from modeling_llama3_siglip2.efficient_ops import packed_causal_block_mask

    # transformers compiles flex attention; a graph made dynamic by another test's shapes hits a bug in
    # Inductor's CPU flex template (undeclared `cur_qSplitSize8`), so each CPU flex test starts from no graphs.
    torch._dynamo.reset()
    model = copy.deepcopy(built[0]).eval()
    use_decoder_attention(model, "flex_attention")
    lengths = [100, 3, 60, 93, 1, 127, 128]
    position_ids = torch.tensor([[p for n in lengths for p in range(n)][:256], list(range(256))])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 200, (2, 256), generator=generator)
    masks = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        embeds = model.get_input_embeddings()(input_ids)
        theirs = model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
    hook.remove()
    assert isinstance(masks[0], BlockMask) and masks[1] is None
    torch.testing.assert_close(masks[0].to_dense(), packed_causal_block_mask(position_ids).to_dense())
    torch.testing.assert_close(hidden, theirs.last_hidden_state, rtol=1e-4, atol=1e-5)
