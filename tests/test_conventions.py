"""The conventions transformers' own models keep, one behaviour per test, on every supported transformers version.

Each test is named for what a user or a transformers component relies on: tuples with `return_dict=False`,
`shift_labels` for context parallelism, `get_image_features` as a `BaseModelOutputWithPooling`, `generate` from
`inputs_embeds`, a decoding step that compiles to one graph, `lm_head` in the tensor-parallel plan, the init of
weights missing from a checkpoint, the cache under its old and new names, the model card on `push_to_hub`, and image
ids that are never loss targets. The generic suite modelled on transformers' own test mixins is in
test_transformers_common.py.
"""

from __future__ import annotations

import copy
import re
import types
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CompileConfig, DynamicCache, PreTrainedModel, StaticCache, set_seed
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration, Llama3Siglip2Model
from modeling_llama3_siglip2.compat import CACHE_NAME, OLD_CACHE_NAME
from modeling_llama3_siglip2.saved_folder import MODEL_CARD

from .test_modeling import naflex_batch, sequence_with_images, text_ids


def tiny_config(**overrides) -> Llama3Siglip2Config:
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                  num_patches=64)
    return Llama3Siglip2Config(text_config=text, vision_config=vision, **overrides)


def image_inputs(config, shapes=((4, 6),), seed=0):
    """One row per image: a few text tokens, the image's placeholders, a few more tokens."""
    k = config.spatial_merge_size
    pixel_values, mask, spatial_shapes = naflex_batch(list(shapes), 64, 4, seed=seed)
    rows = [sequence_with_images(config, [text_ids(3, seed + i), text_ids(4, seed + 10 + i)], [(h // k) * (w // k)])
            for i, (h, w) in enumerate(shapes)]
    return dict(input_ids=torch.tensor(rows), pixel_values=pixel_values, pixel_attention_mask=mask,
                spatial_shapes=spatial_shapes)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama3Siglip2ForConditionalGeneration(tiny_config()).eval()


def assert_outputs_equal(a, b):
    """Equal tensors, equal caches (by their contents), equal nested tuples."""
    if isinstance(a, (tuple, list)):
        assert type(b) in (tuple, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_outputs_equal(x, y)
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    elif isinstance(a, DynamicCache):
        assert a.get_seq_length() == b.get_seq_length() > 0
        for layer_a, layer_b in zip(a.layers, b.layers):
            torch.testing.assert_close(layer_a.keys, layer_b.keys, atol=0, rtol=0)
    else:
        assert a == b


# --- Outputs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [True, False], ids=["ForConditionalGeneration", "Model"])
def test_return_dict_false_gives_the_dict_outputs_as_a_tuple(tiny, head):
    model = tiny if head else tiny.model
    inputs = image_inputs(tiny.config)
    if head:
        inputs["labels"] = inputs["input_ids"]
    with torch.no_grad():
        as_dict = model(**inputs, use_cache=True)
        as_tuple = model(**inputs, use_cache=True, return_dict=False)
        model.config.return_dict = False
        try:
            from_config = model(**inputs, use_cache=True)
        finally:
            model.config.return_dict = True
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert_outputs_equal(as_tuple, as_dict.to_tuple())
    assert_outputs_equal(from_config, as_dict.to_tuple())


def test_the_cache_is_taken_and_returned_under_this_transformers_name(tiny):
    """`cache` from transformers 5.24 on, `past_key_values` before; both names are accepted as input."""
    inputs = image_inputs(tiny.config)
    with torch.no_grad():
        first = tiny(**inputs, use_cache=True)
        assert CACHE_NAME in first and isinstance(first[CACHE_NAME], DynamicCache)
        step = dict(input_ids=torch.tensor([[5]]), use_cache=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_old_name = tiny(**step, **{OLD_CACHE_NAME: copy.deepcopy(first[CACHE_NAME])})
        by_new_name = tiny(**step, cache=copy.deepcopy(first[CACHE_NAME]))
    renamed = CACHE_NAME != OLD_CACHE_NAME
    assert any("`past_key_values` is deprecated" in str(w.message) for w in caught) == renamed
    torch.testing.assert_close(by_old_name.logits, by_new_name.logits, atol=0, rtol=0)
    assert by_new_name[CACHE_NAME].get_seq_length() == inputs["input_ids"].shape[1] + 1
    with pytest.raises(ValueError, match="not both"):
        tiny(**step, cache=DynamicCache(), past_key_values=DynamicCache())


# --- Loss ------------------------------------------------------------------------------------------------------------


def _losses(model, inputs, chunk):
    """The loss of one forward (training mode: the chunked loss runs only there), and the gradients."""
    model.config.loss_chunk_size = chunk
    model.train()
    model.zero_grad()
    try:
        loss = model(**inputs).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.config.loss_chunk_size = 0
        model.zero_grad()
        model.eval()
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [0, 5], ids=["plain", "chunked"])
def test_shift_labels_are_the_targets_and_labels_are_then_ignored(tiny, chunk):
    """As transformers' `test_causal_lm_loss_honors_shift_labels`: position s is trained on `shift_labels[s]`,
    the last position too, whatever `labels` hold."""
    inputs = image_inputs(tiny.config, seed=3)
    B, S = inputs["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    shift_labels = torch.randint(10, 200, (B, S), generator=g)
    shift_labels[:, :2] = -100
    other_labels = torch.randint(10, 200, (B, S), generator=g)

    loss, grads = _losses(tiny, {**inputs, "labels": inputs["input_ids"], "shift_labels": shift_labels}, chunk)
    same_loss, _ = _losses(tiny, {**inputs, "labels": other_labels, "shift_labels": shift_labels}, chunk)
    with torch.no_grad():
        logits = tiny(**inputs).logits
    expected = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same_loss, loss, atol=0, rtol=0)
    if chunk:  # the chunked loss also gives the plain loss's gradients
        _, plain_grads = _losses(tiny, {**inputs, "labels": other_labels, "shift_labels": shift_labels}, 0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 5], ids=["plain", "chunked"])
@pytest.mark.parametrize("label_kind", ["labels", "shift_labels"])
def test_image_boi_and_eoi_ids_are_never_loss_targets(tiny, chunk, label_kind):
    config = tiny.config
    inputs = image_inputs(config, shapes=((4, 6), (3, 8)), seed=5)
    ids = inputs["input_ids"]
    targets = ids if label_kind == "labels" else F.pad(ids[:, 1:], (0, 1), value=-100)
    assert torch.isin(targets, torch.tensor([config.image_token_id, config.boi_token_id, config.eoi_token_id])).any()
    masked = targets.masked_fill(
        (targets == config.image_token_id) | (targets == config.boi_token_id) | (targets == config.eoi_token_id), -100
    )
    loss, _ = _losses(tiny, {**inputs, label_kind: targets}, chunk)
    expected, _ = _losses(tiny, {**inputs, label_kind: masked}, chunk)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


# --- Image features --------------------------------------------------------------------------------------------------


def test_get_image_features_returns_the_projected_tokens_of_each_image_as_pooler_output(tiny):
    config = tiny.config
    inputs = image_inputs(config, shapes=((4, 6), (3, 8)), seed=7)
    pixel_values, mask, shapes = (inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    # A third, empty slot (as batches padded to the same image count have) gives an empty entry.
    pixel_values = torch.cat([pixel_values, torch.zeros_like(pixel_values[:1])])
    mask, shapes = torch.cat([mask, torch.zeros_like(mask[:1])]), torch.cat([shapes, torch.zeros_like(shapes[:1])])
    with torch.no_grad():
        out = tiny.get_image_features(pixel_values, mask, shapes)
        forward = tiny(**inputs)
        as_tuple = tiny.get_image_features(pixel_values, mask, shapes, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert [tuple(t.shape) for t in out.pooler_output] == [(24, 32), (24, 32), (0, 32)]
    torch.testing.assert_close(torch.cat(out.pooler_output), forward.image_hidden_states, atol=0, rtol=0)
    assert out.last_hidden_state.shape == (2, 64, config.vision_config.hidden_size)
    assert out.hidden_states is None and out.attentions is None
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state, atol=0, rtol=0)


def test_get_image_features_returns_the_vision_towers_hidden_states_and_attentions_on_request():
    torch.manual_seed(0)
    model = Llama3Siglip2Model(tiny_config())
    model.set_attn_implementation("eager")
    inputs = image_inputs(model.config)
    images = [inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")]
    layers = model.config.vision_config.num_hidden_layers
    with torch.no_grad():
        out = model.get_image_features(*images, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    torch.testing.assert_close(out.hidden_states[-1].shape, out.last_hidden_state.shape)


# --- Generation and compilation ---------------------------------------------------------------------------------------


def test_generate_from_inputs_embeds_with_images_gives_the_tokens_of_generate_from_input_ids(tiny):
    inputs = image_inputs(tiny.config, seed=9)
    ids = inputs.pop("input_ids")
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        from_ids = tiny.generate(input_ids=ids, **settings, **inputs)
        embeds = tiny.get_input_embeddings()(ids)
        from_embeds = tiny.generate(inputs_embeds=embeds, **settings, **inputs)
    assert from_embeds.tolist() == from_ids[:, ids.shape[1] :].tolist()


def test_the_model_declares_compilation_and_transformers_kwargs():
    for cls in (Llama3Siglip2Model, Llama3Siglip2ForConditionalGeneration):
        assert cls._can_compile_fullgraph
        hints = typing.get_type_hints(cls.forward, include_extras=True)
        assert hints["kwargs"] == Unpack[TransformersKwargs], cls.__name__


@pytest.mark.parametrize("cache_class", [DynamicCache, StaticCache])
def test_a_decoding_step_compiles_without_graph_breaks(tiny, cache_class):
    inputs = image_inputs(tiny.config, seed=11)
    S = inputs["input_ids"].shape[1]
    text_config = tiny.config.get_text_config(decoder=True)
    cache = DynamicCache(config=text_config) if cache_class is DynamicCache else StaticCache(text_config, 2 * S)
    with torch.no_grad():
        prefill = tiny(**inputs, use_cache=True, **{CACHE_NAME: cache})
        step = dict(input_ids=prefill.logits[:, -1:].argmax(-1), position_ids=torch.tensor([[S]]), use_cache=True,
                    **{CACHE_NAME: prefill[CACHE_NAME]})
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(tiny)(**step)
    assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_static_cache_and_compiled_generation_give_the_dynamic_cache_tokens(tiny):
    inputs = image_inputs(tiny.config, seed=13)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    # fullgraph: a graph break in a decoding step is an error. The eager backend traces without compiling kernels.
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        dynamic = tiny.generate(**inputs, **settings)
        static = tiny.generate(**inputs, **settings, cache_implementation="static")
        compiled = tiny.generate(**inputs, **settings, cache_implementation="static", compile_config=compile_config)
    assert hasattr(tiny, "_compiled_call"), "generate did not compile the decoding steps"
    del tiny._compiled_call
    assert static.tolist() == dynamic.tolist() == compiled.tolist()


# --- Parallelism plans -----------------------------------------------------------------------------------------------


def test_lm_head_is_in_the_tensor_and_pipeline_parallel_plans_and_every_entry_names_a_module():
    model = Llama3Siglip2ForConditionalGeneration(tiny_config(tie_word_embeddings=True))
    plan = model.tp_plan
    assert plan.get("lm_head") == "colwise_gather_output"
    assert "lm_head" in model.pp_plan
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
    # As transformers' `test_tp_plan_matches_params`: `*` stands for a layer number.
    unused = [p for p in plan if not any(re.fullmatch(re.escape(p).replace(r"\*", r"\d+"), n) for n in names)]
    assert not unused, unused
    # A tied head is the embedding's parameter: where transformers shards the embedding, the head must be too.
    embedding = "model.language_model.embed_tokens"
    assert embedding not in plan or "lm_head" in plan


# --- Initialisation of missing weights --------------------------------------------------------------------------------


class seeded_weight_init:
    """transformers' `seeded_weight_init` (tests/test_modeling_common.py): one seed before each module's init, so
    the same module gets the same values whichever path initialises it."""

    def __enter__(self):
        self.original = PreTrainedModel._initialize_weights

        def seeded(*args, **kwargs):
            set_seed(42)
            self.original(*args, **kwargs)

        PreTrainedModel._initialize_weights = seeded

    def __exit__(self, *exc):
        PreTrainedModel._initialize_weights = self.original


def test_vision_weights_missing_from_a_checkpoint_get_the_constructors_init(tmp_path):
    config = tiny_config()
    with seeded_weight_init():
        constructed = Llama3Siglip2ForConditionalGeneration(copy.deepcopy(config))
    torch.manual_seed(1)
    trained = Llama3Siglip2ForConditionalGeneration(copy.deepcopy(config))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # unlike any init
    trained.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".vision_tower." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})

    with seeded_weight_init():
        loaded = Llama3Siglip2ForConditionalGeneration.from_pretrained(tmp_path)
    expected, got, saved = constructed.state_dict(), loaded.state_dict(), trained.state_dict()
    vision = [k for k in got if ".vision_tower." in k]
    assert vision and all(k not in weights or ".vision_tower." in k for k in vision)
    different = [k for k in vision if not torch.equal(got[k], expected[k])]
    assert not different, f"initialised unlike the constructor: {different}"
    assert all(torch.equal(got[k], saved[k]) for k in got if ".vision_tower." not in k)  # loaded ones untouched


# --- Hub -------------------------------------------------------------------------------------------------------------


def test_the_folders_model_card_survives_push_to_hub(tiny, monkeypatch):
    """transformers writes its card over README.md before uploading; for a new repository it is an empty template."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import hub

    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md in this repository")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(hub.ModelCard, "load", no_card)
    tiny.push_to_hub("someone/tiny-llama3-siglip2", tags=["my-tag"])

    card = huggingface_hub.ModelCard(uploaded["README.md"].decode())
    assert "model.safetensors" in uploaded
    assert card.text == huggingface_hub.ModelCard(MODEL_CARD).text
    assert {"llama3-siglip2", "vision-language", "my-tag"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-text-to-text"
