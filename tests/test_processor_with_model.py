"""The processor's outputs drive the model: forward, generate, and transformers' image-text-to-text pipeline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import pipeline

IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (17, 60), "blue")]


@pytest.mark.parametrize("fixture", ["built", "built_merge2"])
def test_model_forward_runs_on_a_processed_batch(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    inputs = processor(text=["<|image|>Describe the image.", "a red box <|image|>"], images=IMAGES,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_model_forward_takes_sft_labels_from_the_processor(built):
    model, processor = built
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A red box."}]
    with torch.no_grad():
        loss = model(**processor.build_sft_sample(chat, images=IMAGES[:1])).loss
    assert torch.isfinite(loss)


def test_generate_appends_new_tokens_to_a_processed_prompt(built):
    model, processor = built
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_a_composed_model_stops_generating_at_end_of_text_and_at_end_of_turn(built):
    model, processor = built
    ids = processor.tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert model.generation_config.eos_token_id == ids
    assert model.generation_config.pad_token_id == processor.pad_token_id


def test_chat_eos_token_ids_follow_llama3_instruct():
    from modeling_llama3_siglip2.builder import chat_eos_token_ids, default_generation_config
    from processing.tokenizer import build_byte_level_bpe_tokenizer

    tokenizer = build_byte_level_bpe_tokenizer(["a red box"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eom_id|>"]})  # Llama 3.1's end of tool message
    expected = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert chat_eos_token_ids(tokenizer) == expected
    assert chat_eos_token_ids(tokenizer, extra_ids=[expected[2], 7]) == [*expected, 7]
    config = default_generation_config(tokenizer)
    assert config.eos_token_id == expected and config.bos_token_id == tokenizer.bos_token_id


def test_pipeline_on_a_saved_folder_returns_text_for_an_image_and_for_a_chat(built, tmp_path):
    model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    generator = pipeline("image-text-to-text", model=str(tmp_path))

    plain = generator(images=IMAGES[0], text="<|image|>Describe the image.", max_new_tokens=3)
    assert isinstance(plain[0]["generated_text"], str)
    assert plain[0]["generated_text"].startswith("<|image|>Describe the image.")

    chat = [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "Describe."}]}]
    answered = generator(text=chat, max_new_tokens=3)[0]["generated_text"]
    assert answered[-1]["role"] == "assistant" and isinstance(answered[-1]["content"], str)
