"""Ranks whose batches differ (images or none, one image or several of other sizes) must drive sharded training
through the same collectives, or the job hangs.

DeepSpeed ZeRO-3 all-gathers a parameter when a module's pre-forward hook runs and, during the engine's forward, also
whenever a partitioned parameter is read by attribute (`module.weight`, through its `ZeROOrderedDict`). FSDP2
unshards per module call. So two ranks stay in step exactly when they call the same modules in the same order and
read the same parameters by attribute in the same order. These tests record both sequences on CPU, with DeepSpeed's
own trigger (attribute reads of `_parameters`), for batches that differ the way real mixed data does.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from PIL import Image

from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration
from processing import Llama3Siglip2ImageProcessor, Llama3Siglip2Processor
from processing.collator import MultimodalPackingCollator


class _RecordingParameters(OrderedDict):
    """`module._parameters` that logs every attribute read of a parameter, as DeepSpeed's ZeROOrderedDict sees it."""

    log: list | None = None
    owner: str = ""

    def __getitem__(self, key):
        if _RecordingParameters.log is not None:
            _RecordingParameters.log.append(("read", f"{self.owner}.{key}"))
        return super().__getitem__(key)


def record_calls_and_reads(model, batch) -> list[tuple[str, str]]:
    """The module calls and parameter reads of one training forward + backward, in order."""
    events: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: events.append(("call", name))))
        recording = _RecordingParameters(module._parameters)
        recording.owner = name
        module._parameters = recording
    _RecordingParameters.log = events
    try:
        model(**batch).loss.backward()
    finally:
        _RecordingParameters.log = None
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module._parameters = OrderedDict(module._parameters)
    return events


@pytest.fixture(scope="module")
def tiny(text_tokenizer, tmp_path_factory):
    # A copy of the session's tokenizer: the processor adds its image tokens to the one it is given.
    folder = tmp_path_factory.mktemp("tokenizer")
    text_tokenizer.save_pretrained(folder)
    processor = Llama3Siglip2Processor(Llama3Siglip2ImageProcessor(patch_size=4, max_patches=64, merge_size=2),
                                       text_tokenizer.__class__.from_pretrained(folder))
    config = Llama3Siglip2Config(
        text_config={"vocab_size": len(processor.tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "patch_size": 4, "num_patches": 64},
        spatial_merge_size=2, image_token_id=processor.image_token_id, boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
    )
    torch.manual_seed(0)
    model = Llama3Siglip2ForConditionalGeneration(config).train()
    return model, processor


def packed_batch(processor, samples):
    collator = MultimodalPackingCollator.from_processor(processor, seq_len=128)
    encoded = []
    for text, images in samples:
        out = processor(text=text, images=images or None, return_tensors="pt", return_labels=True)
        encoded.append(out)
    return collator(encoded)


def _batches(processor):
    photo = Image.new("RGB", (40, 24), "red")
    tall = Image.new("RGB", (16, 48), "blue")
    return {
        "one image": [("<|image|>a red box", [photo])],
        "two images of other sizes": [("<|image|>a red box", [photo]), ("<|image|>a blue box <|image|>", [tall, photo])],
        "text only": [("a red box and a blue box", []), ("no image here", [])],
    }


def test_every_kind_of_batch_calls_the_same_modules_and_reads_the_same_parameters(tiny):
    model, processor = tiny
    sequences = {}
    for kind, samples in _batches(processor).items():
        model.zero_grad(set_to_none=True)
        sequences[kind] = record_calls_and_reads(model, packed_batch(processor, samples))
    reference_kind, reference = next(iter(sequences.items()))
    assert any(event == ("call", "model.vision_tower") for event in reference)
    for kind, events in sequences.items():
        first_difference = next((i for i, (a, b) in enumerate(zip(reference, events)) if a != b), None)
        assert events == reference, (
            f"'{kind}' and '{reference_kind}' differ at event {first_difference}: "
            f"{events[first_difference] if first_difference is not None else len(events)} vs "
            f"{reference[first_difference] if first_difference is not None else len(reference)}"
        )


def test_a_text_only_batch_gives_every_image_parameter_a_gradient(tiny):
    """ZeRO-3 and DDP reduce a gradient per parameter: one that only image ranks produce would hang the others."""
    model, processor = tiny
    model.zero_grad(set_to_none=True)
    model(**packed_batch(processor, _batches(processor)["text only"])).loss.backward()
    image_parameters = [n for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    missing = [n for n, p in model.named_parameters() if n in image_parameters and p.grad is None]
    assert image_parameters and not missing
