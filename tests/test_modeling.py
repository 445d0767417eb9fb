"""The composed model against transformers' own Llama and SigLIP2, and against hand-computed references."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, Siglip2VisionModel

from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration


def naflex_batch(shapes, max_patches, patch_size, seed=0):
    """Random NaFlex inputs for images of (h, w) patches, padded to `max_patches`, like the image processor's."""
    g = torch.Generator().manual_seed(seed)
    n, dim = len(shapes), 3 * patch_size * patch_size
    pixel_values = torch.zeros(n, max_patches, dim)
    mask = torch.zeros(n, max_patches, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        pixel_values[i, : h * w] = torch.rand(h * w, dim, generator=g) * 2 - 1
        mask[i, : h * w] = 1
    return pixel_values, mask, torch.tensor(shapes, dtype=torch.long)


def sequence_with_images(config, text_ids_per_segment, image_token_counts):
    """text, boi, image×n, eoi, text, ... as the processor expands `<|image|>` placeholders."""
    ids = []
    for i, segment in enumerate(text_ids_per_segment):
        ids += segment
        if i < len(image_token_counts):
            ids += [config.boi_token_id] + [config.image_token_id] * image_token_counts[i] + [config.eoi_token_id]
    return ids


def reference_merge(features_LD, h, w, k):
    """Merge k×k blocks with explicit loops: the definition the vectorised merge must match."""
    grid = features_LD[: h * w].reshape(h, w, -1)
    tokens = []
    for block_row in range(h // k):
        for block_col in range(w // k):
            block = grid[block_row * k : (block_row + 1) * k, block_col * k : (block_col + 1) * k]
            tokens.append(block.reshape(-1))
    return torch.stack(tokens)


def text_ids(count, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 200, (count,), generator=g).tolist()


def test_text_only_logits_equal_transformers_llama(built, tiny_llama_dir):
    model, _ = built
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    input_ids = torch.tensor([text_ids(17, 0), text_ids(17, 1)])
    with torch.no_grad():
        ours = model(input_ids=input_ids).logits
        theirs = reference(input_ids=input_ids).logits
    vocab = theirs.shape[-1]
    assert ours.shape[-1] > vocab  # the image tokens were added to the vocabulary
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=1e-5, rtol=0)


def test_builder_loads_text_weights_exactly_and_new_rows_are_the_mean(built, tiny_llama_dir):
    model, processor = built
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    old = reference.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert new.shape[0] == len(processor.tokenizer)
    torch.testing.assert_close(new[: old.shape[0]], old, atol=0, rtol=0)
    for row in new[old.shape[0] :]:
        torch.testing.assert_close(row, old.mean(0), atol=1e-6, rtol=0)
    assert model.config.image_token_id == processor.image_token_id


def test_builder_takes_the_vision_half_of_a_full_siglip2(tiny_llama_dir, tiny_siglip2_full_dir):
    from transformers import Siglip2Model

    from modeling_llama3_siglip2 import from_pretrained_components

    model, _ = from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_full_dir), max_patches=64)
    reference = Siglip2Model.from_pretrained(tiny_siglip2_full_dir).vision_model.state_dict()
    ours = model.model.vision_tower.state_dict()
    assert set(ours) == {k for k in reference if not k.startswith("head.")}
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_vision_tower_equals_transformers_siglip2_on_padded_batches(built, tiny_siglip2_dir):
    model, _ = built
    reference = Siglip2VisionModel.from_pretrained(tiny_siglip2_dir).eval()
    pixel_values, mask, shapes = naflex_batch([(8, 8), (4, 6), (2, 10), (5, 3)], 64, 4)
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values, mask, shapes).last_hidden_state
        theirs = reference(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
    for i, (h, w) in enumerate(shapes.tolist()):
        torch.testing.assert_close(ours[i, : h * w], theirs[i, : h * w], atol=1e-5, rtol=0)


def test_padding_patches_do_not_change_valid_outputs(built):
    model, _ = built
    shapes = [(4, 6), (2, 10)]
    tight = naflex_batch(shapes, 24, 4, seed=3)  # L = the longest image
    loose = naflex_batch(shapes, 64, 4, seed=3)
    loose[0][:, 24:] = torch.randn(2, 40, 48) * 100  # garbage in the padding must not leak into valid patches
    with torch.no_grad():
        a = model.get_image_features(*tight).pooler_output
        b = model.get_image_features(*loose).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["built", "built_merge2"])
def test_forward_with_images_equals_hand_computed_reference(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    config, k = model.config, model.config.spatial_merge_size
    shapes = [(4, 6), (2, 8), (6, 6), (4, 4)]  # two images per sample, grids divisible by 2
    pixel_values, mask, spatial_shapes = naflex_batch(shapes, 64, 4, seed=5)
    counts = [(h // k) * (w // k) for h, w in shapes]
    rows = [
        sequence_with_images(config, [text_ids(3, 1), text_ids(4, 2), text_ids(2, 3)], counts[:2]),
        sequence_with_images(config, [text_ids(5, 4), text_ids(1, 5), text_ids(3, 6)], counts[2:]),
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       pixel_attention_mask=mask, spatial_shapes=spatial_shapes).logits
        vision = model.model.vision_tower(pixel_values, mask, spatial_shapes).last_hidden_state
        merged = torch.cat([reference_merge(vision[i], h, w, k) for i, (h, w) in enumerate(shapes)])
        image_tokens = model.model.multi_modal_projector(merged)
        embeds = model.get_input_embeddings()(input_ids).clone()
        embeds[input_ids == config.image_token_id] = image_tokens
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_logits_of_each_sample_alone(built, attn_implementation):
    model, _ = built
    model.set_attn_implementation(attn_implementation)
    try:
        config = model.config
        first = sequence_with_images(config, [text_ids(4, 7), text_ids(3, 8)], [24])
        second = sequence_with_images(config, [text_ids(2, 9), text_ids(5, 10)], [16])
        pv, mask, shapes = naflex_batch([(4, 6), (4, 4)], 64, 4, seed=11)
        packed_ids = torch.tensor([first + second])
        position_ids = torch.tensor([list(range(len(first))) + list(range(len(second)))])
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=position_ids, pixel_values=pv,
                           pixel_attention_mask=mask, spatial_shapes=shapes).logits[0]
            alone_first = model(input_ids=torch.tensor([first]), pixel_values=pv[:1], pixel_attention_mask=mask[:1],
                                spatial_shapes=shapes[:1]).logits[0]
            alone_second = model(input_ids=torch.tensor([second]), pixel_values=pv[1:], pixel_attention_mask=mask[1:],
                                 spatial_shapes=shapes[1:]).logits[0]
        torch.testing.assert_close(packed, torch.cat([alone_first, alone_second]), atol=1e-5, rtol=0)
    finally:
        model.set_attn_implementation("sdpa")


def test_greedy_generate_with_cache_equals_repeated_full_forwards(built_merge2):
    model, _ = built_merge2
    config = model.config
    prompt = sequence_with_images(config, [text_ids(3, 12), text_ids(4, 13)], [6])
    pv, mask, shapes = naflex_batch([(4, 6)], 64, 4, seed=14)
    images = dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
    new_tokens = 8
    with torch.no_grad():
        cached = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                **images)
        ids = torch.tensor([prompt])
        for _ in range(new_tokens):
            next_id = model(input_ids=ids, use_cache=False, **images).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert cached.tolist() == ids.tolist()


def test_loss_with_num_items_in_batch_is_the_token_average_across_micro_batches(built):
    model, _ = built
    ids_a, ids_b = torch.tensor([text_ids(12, 20)]), torch.tensor([text_ids(12, 21)])
    labels_a = ids_a.clone()
    labels_b = ids_b.clone()
    labels_b[0, :9] = -100  # b has far fewer target tokens than a
    n_a, n_b = 11, 3  # targets after the shift: labels 1..11 of a, 9..11 of b
    with torch.no_grad():
        total = n_a + n_b
        accumulated = (model(input_ids=ids_a, labels=labels_a, num_items_in_batch=total).loss
                       + model(input_ids=ids_b, labels=labels_b, num_items_in_batch=total).loss)
        mean_a = model(input_ids=ids_a, labels=labels_a).loss
        mean_b = model(input_ids=ids_b, labels=labels_b).loss
    torch.testing.assert_close(accumulated, (mean_a * n_a + mean_b * n_b) / total)


def test_text_only_training_batch_still_reaches_the_image_modules(built):
    model, _ = built
    model.train()
    try:
        model.zero_grad()
        ids = torch.tensor([text_ids(10, 30)])
        model(input_ids=ids, labels=ids).loss.backward()
        projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
        patch_grad = model.model.vision_tower.embeddings.patch_embedding.weight.grad
        assert projector_grad is not None and patch_grad is not None  # every rank calls the same modules
        assert projector_grad.abs().sum() == 0 and patch_grad.abs().sum() == 0  # ... which contribute nothing
    finally:
        model.zero_grad()
        model.eval()


def test_gradient_checkpointing_gives_the_same_gradients(built):
    model, _ = built
    pv, mask, shapes = naflex_batch([(4, 4)], 64, 4, seed=40)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(3, 41), text_ids(3, 42)], [16])])

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain = grads()
        model.gradient_checkpointing_enable()
        checkpointed = grads()
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


# --- Errors ---------------------------------------------------------------------------------------------------------


def test_mismatched_image_tokens_and_features_name_both_counts(built):
    model, _ = built
    pv, mask, shapes = naflex_batch([(4, 4)], 64, 4)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(3, 1), text_ids(2, 2)], [15])])
    with pytest.raises(ValueError, match="15 image tokens.*16 features"):
        model(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(spatial_merge_size=0), "spatial_merge_size"),
        (dict(image_token_id=10_000), "image_token_id=10000 is outside"),
        (dict(boi_token_id=-1), "boi_token_id=-1 is outside"),
        (dict(image_token_id=5, boi_token_id=5, eoi_token_id=6), "must differ"),
    ],
)
def test_bad_config_raises_a_value_error_that_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Llama3Siglip2Config(text_config=dict(vocab_size=1000), **kwargs)


def test_wrong_pixel_value_shapes_raise_value_errors(built_merge2):
    model, _ = built_merge2
    pv, mask, shapes = naflex_batch([(4, 4)], 64, 4)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(2, 1), text_ids(2, 2)], [4])])
    cases = [
        (dict(pixel_values=pv[0], pixel_attention_mask=mask, spatial_shapes=shapes), "must be \\(N, L, P\\)"),
        (dict(pixel_values=pv[..., :40], pixel_attention_mask=mask, spatial_shapes=shapes), "needs 48"),
        (dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes[:, :1]), "spatial_shapes must be"),
        (dict(pixel_values=pv, pixel_attention_mask=mask[:, :10], spatial_shapes=shapes), "pixel_attention_mask must be"),
        (dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[4, 5]])), "disagrees"),
    ]
    odd = naflex_batch([(3, 4)], 64, 4)
    cases.append((dict(pixel_values=odd[0], pixel_attention_mask=odd[1], spatial_shapes=odd[2]), "cannot be merged"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, **kwargs)


def test_model_without_builder_has_consistent_defaults():
    config = Llama3Siglip2Config(text_config=dict(vocab_size=500, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
                                 vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, patch_size=4, num_patches=16))
    model = Llama3Siglip2ForConditionalGeneration(config)
    assert model.model.multi_modal_projector.linear_1.in_features == 16
    assert not hasattr(model.model.vision_tower, "head")  # the pooling head is never used by the VLM
    assert {config.image_token_id, config.boi_token_id, config.eoi_token_id} == {497, 498, 499}


def test_chunked_loss_setting_gives_the_plain_loss_and_gradients(built):
    model, _ = built
    pv, mask, shapes = naflex_batch([(4, 4)], 64, 4, seed=50)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(9, 51), text_ids(7, 52)], [16])])
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)

    def loss_and_grads(chunk):
        model.config.loss_chunk_size = chunk
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain, plain_grads = loss_and_grads(0)
        chunked, chunked_grads = loss_and_grads(5)  # 5 does not divide the target count
    finally:
        model.config.loss_chunk_size = 0
        model.zero_grad()
        model.eval()
    assert chunked.logits is None and plain.logits is not None  # the point: no (B, S, V) logits
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-6, rtol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_attention_never_runs_on_cudnn_whose_per_shape_plans_stall_naflex_steps(built, monkeypatch):
    """Every sdpa call of the vision tower and the decoder runs with cuDNN attention switched off (its host-side
    plan for each new shape cost ~120 ms in every step with a new image shape on an H200), and the switch is back
    on afterwards for the rest of the program."""
    model, _ = built
    cudnn_enabled_at_call = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        cudnn_enabled_at_call.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    pv, mask, shapes = naflex_batch([(4, 4), (2, 6)], 64, 4)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(3, 1), text_ids(2, 2), text_ids(2, 3)], [16, 12])])
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
    vision_layers = model.config.vision_config.num_hidden_layers
    text_layers = model.config.text_config.num_hidden_layers
    assert len(cudnn_enabled_at_call) == vision_layers + text_layers
    assert not any(cudnn_enabled_at_call)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_training_step_with_images_reads_the_device_once_and_matches_masked_scatter(built):
    """Placeholder positions come back with the image shapes in one read, and the image tokens go in with
    `index_copy`: no `masked_select` (masked_scatter's backward; a host sync on a GPU) and no `.item()` of ours in
    the step; our one `nonzero` is the positions', taken from the host copy (the plain loss here; the chunked loss
    keeps its own). transformers' mask code reads two flags (`.all()` checks). The gradients equal the
    `masked_scatter` path's."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        """Every aten op of the step; for the ones that read device data on the host, the file that called it."""

        def __init__(self):
            super().__init__()
            self.ops, self.readers = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops.append(name)
            if name in ("nonzero", "_local_scalar_dense", "masked_select"):
                callers = [f.filename for f in traceback.extract_stack() if "/torch/" not in f.filename]
                self.readers.append((name, "masking_utils" if "masking_utils" in callers[-2] else
                                     "ours" if "modeling_llama3_siglip2" in callers[-2] else callers[-2]))
            return func(*args, **(kwargs or {}))

    model, _ = built
    pv, mask, shapes = naflex_batch([(4, 4), (2, 6)], 64, 4)
    ids = torch.tensor([sequence_with_images(model.config, [text_ids(3, 1), text_ids(2, 2), text_ids(2, 3)], [16, 12])])
    inputs = {"input_ids": ids, "pixel_values": pv, "pixel_attention_mask": mask, "spatial_shapes": shapes,
              "labels": ids}

    def gradients():
        model.zero_grad()
        model(**inputs).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        with Recorder() as recorder:
            indexed = gradients()
        plain = model.model.scatter_image_tokens
        model.model.scatter_image_tokens = lambda embeds, mask_BS, tokens, positions=None: plain(embeds, mask_BS, tokens)
        try:
            scattered = gradients()
        finally:
            del model.model.scatter_image_tokens
    finally:
        model.zero_grad()
        model.eval()
    assert "masked_select" not in recorder.ops and "masked_scatter" not in recorder.ops
    assert "index_copy" in recorder.ops
    assert sorted(recorder.readers) == [("_local_scalar_dense", "masking_utils"), ("_local_scalar_dense", "masking_utils"),
                                        ("nonzero", "ours")]
    assert indexed.keys() == scattered.keys()
    for name in indexed:
        torch.testing.assert_close(indexed[name], scattered[name], msg=name)
