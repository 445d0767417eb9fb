"""A subset of transformers' common model and generation tests, written for this model as an in-tree model is tested.

Modelled on `ModelTesterMixin` (tests/test_modeling_common.py of the transformers sdist) and `GenerationTesterMixin`
(tests/generation/test_utils.py), on a tiny config with images, as transformers' LLaVA tests do. The mixins are not
imported: they live in transformers' test tree, which no wheel ships. Tests for the conventions the issue tracker
asked for (tuples, `shift_labels`, `get_image_features`, `inputs_embeds` in generate, compile, TP plan, missing-weight
init, the cache's two names) are in test_conventions.py; parity with Llama and SigLIP2, packing, gradient
checkpointing and the KV-cache equivalence are in test_modeling.py.

Mixin tests that do not apply here, and why:
- flash-attention and flex-attention tests: SigLIP2 has neither kernel in transformers (`_supports_flash_attn` and
  `_supports_flex_attn` are False); the decoder alone can use flex through `efficient_ops.use_decoder_attention`.
- encoder-decoder, sequence-classification (`test_problem_types`), `get_text/audio/video_features`, MoE router
  logits, sliding-window masks, `test_feed_forward_chunking`, `test_keep_in_fp32_modules*`,
  `test_reverse_loading_mapping`: this model has none of those parts.
- `test_resize_position_vector_embeddings`: SigLIP2's position grid is resized per image at run time, not stored per
  length; Llama uses RoPE.
- rope scaling and axial rope tests: they test transformers' Llama and SigLIP2 code, unchanged here.
- device-map, CPU/disk offload, multi-GPU model parallelism and DeepSpeed resize tests: they need accelerators or
  DeepSpeed, which CI lacks; tests/test_gpu.py covers the GPU paths.
- `test_torch_compile_for_training` and inductor-compiled generation: inductor on a 2-core CI machine is too slow;
  test_conventions.py compiles the decoding step with the eager backend and `fullgraph=True` instead.
- `test_capture_outputs_decorator`: like LLaVA, our classes do not use `capture_outputs`; the two towers do, and
  test_attention_outputs below checks that the attentions and hidden states come through.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, set_seed

from modeling_llama3_siglip2 import Llama3Siglip2ForConditionalGeneration, Llama3Siglip2Model
from modeling_llama3_siglip2.compat import CACHE_NAME

from .test_conventions import image_inputs, seeded_weight_init, tiny_config
from .test_modeling import naflex_batch, sequence_with_images, text_ids

MODEL_CLASSES = [Llama3Siglip2Model, Llama3Siglip2ForConditionalGeneration]


def make(model_class, config=None, seed=0):
    torch.manual_seed(seed)
    return model_class(copy.deepcopy(config or tiny_config())).eval()


def main_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


# --- ModelTesterMixin ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_save_load_gives_identical_outputs(model_class, tmp_path):
    model = make(model_class)
    inputs = image_inputs(model.config)
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(reloaded(**inputs)), main_output(model(**inputs)), atol=0, rtol=0)


def test_tied_head_is_saved_once_and_reloads_tied(tmp_path):
    model = make(Llama3Siglip2ForConditionalGeneration, tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    reloaded = Llama3Siglip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_determinism(model_class):
    model = make(model_class)
    inputs = image_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(model(**inputs)), atol=0, rtol=0)


def test_batching_equivalence():
    """A row's outputs do not depend on the other rows of its batch (their text or their images)."""
    model = make(Llama3Siglip2ForConditionalGeneration)
    inputs = image_inputs(model.config, shapes=((4, 6), (3, 8), (6, 4)), seed=2)
    with torch.no_grad():
        batched = model(**inputs).logits
        for row in range(3):
            alone = model(**{k: v[row : row + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("how", ["kwarg", "config"])
def test_attention_and_hidden_state_outputs(model_class, how):
    config = tiny_config()
    if how == "config":
        for c in (config, config.text_config, config.vision_config):
            c.output_attentions = c.output_hidden_states = True
    model = make(model_class, config)
    model.set_attn_implementation("eager")
    inputs = image_inputs(model.config)
    flags = dict(output_attentions=True, output_hidden_states=True) if how == "kwarg" else {}
    with torch.no_grad():
        out = model(**inputs, **flags)
    B, S = inputs["input_ids"].shape
    text = model.config.text_config
    assert len(out.attentions) == text.num_hidden_layers
    assert out.attentions[0].shape == (B, text.num_attention_heads, S, S)
    assert len(out.hidden_states) == text.num_hidden_layers + 1
    assert out.hidden_states[0].shape == (B, S, text.hidden_size)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_inputs_embeds_match_input_ids(model_class):
    model = make(model_class)
    inputs = image_inputs(model.config)
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        from_ids = main_output(model(input_ids=ids, **inputs))
        from_embeds = main_output(model(inputs_embeds=model.get_input_embeddings()(ids), **inputs))
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings(tie):
    model = make(Llama3Siglip2ForConditionalGeneration, tiny_config(tie_word_embeddings=tie))
    vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 10)
    assert model.config.text_config.vocab_size == vocab + 10
    assert model.get_output_embeddings().weight.shape[0] == vocab + 10
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    with torch.no_grad():
        logits = model(**image_inputs(model.config)).logits
    assert logits.shape[-1] == vocab + 10


def test_get_and_set_embeddings():
    model = make(Llama3Siglip2ForConditionalGeneration)
    embedding = torch.nn.Embedding(model.config.text_config.vocab_size, model.config.text_config.hidden_size)
    model.set_input_embeddings(embedding)
    assert model.get_input_embeddings() is embedding is model.model.language_model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert model.main_input_name == "input_ids"


def test_can_init_all_missing_weights():
    """transformers' test: from_pretrained with no weights at all initialises every one as the constructor does."""
    config = tiny_config()
    for model_class in MODEL_CLASSES:
        with seeded_weight_init():
            from_init = model_class(copy.deepcopy(config))
            from_pretrained = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
        expected, got = from_init.state_dict(), from_pretrained.state_dict()
        assert sorted(expected) == sorted(got)
        assert not [k for k, v in got.items() if v.device.type == "meta"]
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{model_class.__name__}: {different}"


def test_eager_matches_sdpa():
    model = make(Llama3Siglip2ForConditionalGeneration)
    inputs = image_inputs(model.config, shapes=((4, 6), (3, 8)), seed=4)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :3] = 0  # a left-padded row
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[mask], sdpa[mask], atol=1e-5, rtol=1e-5)


def test_can_be_initialized_on_meta():
    with torch.device("meta"):
        model = Llama3Siglip2ForConditionalGeneration(tiny_config())
    assert all(p.device.type == "meta" for p in model.parameters())


# --- GenerationTesterMixin -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return make(Llama3Siglip2ForConditionalGeneration, seed=3)


def test_sample_generate_is_reproducible_with_a_seed(generator):
    inputs = image_inputs(generator.config, seed=20)
    runs = []
    for _ in range(2):
        set_seed(7)
        with torch.no_grad():
            runs.append(generator.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20).tolist())
    assert runs[0] == runs[1]


@pytest.mark.parametrize("search", [dict(num_beams=2, num_return_sequences=2),
                                    dict(num_return_sequences=2, do_sample=True, top_k=1)],
                         ids=["beam_search", "return_sequences"])
def test_generate_keeps_each_rows_images_with_its_copies(generator, search):
    """`generate` copies each row per beam or returned sequence; rows of 2 and of 1 images must keep their own."""
    config = generator.config
    pv, mask, shapes = naflex_batch([(4, 6), (2, 4), (4, 4)], 64, 4, seed=21)
    rows = [sequence_with_images(config, [text_ids(3, 1), text_ids(2, 2), text_ids(3, 3)], [24, 8]),
            sequence_with_images(config, [text_ids(4, 4), text_ids(2, 5)], [16])]
    pad = len(rows[0]) - len(rows[1])
    batch = dict(input_ids=torch.tensor([rows[0], [0] * pad + rows[1]]),
                 attention_mask=torch.tensor([[1] * len(rows[0]), [0] * pad + [1] * len(rows[1])]),
                 pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
    settings = dict(max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True, output_logits=True,
                    **{"do_sample": False, **search})
    with torch.no_grad():
        copies = generator.generate(**batch, **settings)
        first = generator.generate(input_ids=torch.tensor(rows[:1]), pixel_values=pv[:2], pixel_attention_mask=mask[:2],
                                   spatial_shapes=shapes[:2], **settings)
        second = generator.generate(input_ids=torch.tensor(rows[1:]), pixel_values=pv[2:],
                                    pixel_attention_mask=mask[2:], spatial_shapes=shapes[2:], **settings)
        rows_alone = generator(**batch).logits[:, -1]
    # Every copy's first step sees its row as a plain forward of the batch does (no copies involved).
    torch.testing.assert_close(copies.logits[0], rows_alone.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)
    assert copies.sequences[:, -3:].tolist() == first.sequences[:, -3:].tolist() + second.sequences[:, -3:].tolist()


def test_generate_returns_scores_attentions_and_hidden_states_per_step(generator):
    generator.set_attn_implementation("eager")
    try:
        inputs = image_inputs(generator.config, seed=22)
        with torch.no_grad():
            out = generator.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                     return_dict_in_generate=True, output_scores=True, output_logits=True,
                                     output_attentions=True, output_hidden_states=True)
    finally:
        generator.set_attn_implementation("sdpa")
    layers = generator.config.text_config.num_hidden_layers
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == 3
    assert all(len(step) == layers for step in out.attentions)
    assert all(len(step) == layers + 1 for step in out.hidden_states)
    assert out.sequences[0, -3:].tolist() == [int(s.argmax()) for s in out.scores]


def test_left_padded_batch_generates_what_each_row_generates_alone(generator):
    config = generator.config
    short = image_inputs(config, shapes=((2, 4),), seed=23)
    long = image_inputs(config, shapes=((4, 6),), seed=24)
    pad = long["input_ids"].shape[1] - short["input_ids"].shape[1]
    batch = dict(
        input_ids=torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short["input_ids"]], 1),
                             long["input_ids"]]),
        attention_mask=torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long),
                                             torch.ones_like(short["input_ids"])], 1),
                                  torch.ones_like(long["input_ids"])]),
        pixel_values=torch.cat([short["pixel_values"], long["pixel_values"]]),
        pixel_attention_mask=torch.cat([short["pixel_attention_mask"], long["pixel_attention_mask"]]),
        spatial_shapes=torch.cat([short["spatial_shapes"], long["spatial_shapes"]]),
    )
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        together = generator.generate(**batch, **settings)[:, -4:].tolist()
        alone = [generator.generate(**row, **settings)[0, -4:].tolist() for row in (short, long)]
    assert together == alone


def test_generate_continues_from_a_returned_cache(generator):
    inputs = image_inputs(generator.config, seed=25)
    settings = dict(do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        whole = generator.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **settings).sequences
        first = generator.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **settings)
        assert isinstance(first[CACHE_NAME], DynamicCache)
        rest = generator.generate(input_ids=first.sequences, max_new_tokens=3, min_new_tokens=3,
                                  **{CACHE_NAME: copy.deepcopy(first[CACHE_NAME])}, **settings).sequences
    assert rest.tolist() == whole.tolist()


def test_prompt_lookup_decoding_gives_the_greedy_tokens(generator):
    inputs = image_inputs(generator.config, seed=26)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        greedy = generator.generate(**inputs, **settings)
        lookup = generator.generate(**inputs, **settings, prompt_lookup_num_tokens=2)
    assert lookup.tolist() == greedy.tolist()
