"""A small byte-level BPE tokenizer with Llama 3's special tokens, built locally.

Tests and the default training run must not download a tokenizer, so they train one here in a fraction of a
second with the `tokenizers` library. It has the same special tokens (and so the same chat template) as a real
Llama 3 tokenizer, plus the image tokens this package adds, so the code paths are the ones a real run takes.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .processing_llama3_siglip2 import BEGIN_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN, IMAGE_TOKEN, PAD_TOKEN

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
LLAMA3_SPECIAL_TOKENS = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
IMAGE_SPECIAL_TOKENS = (IMAGE_TOKEN, BEGIN_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN, PAD_TOKEN)


def build_byte_level_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    with_image_tokens: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` that prepends `<|begin_of_text|>` like Llama 3's.

    Every byte is in the alphabet, so any string encodes. `with_image_tokens=False` gives a plain "text model"
    tokenizer, the kind a Llama checkpoint ships, to which the processor must add the image tokens itself.
    """
    special_tokens = list(LLAMA3_SPECIAL_TOKENS) + (list(IMAGE_SPECIAL_TOKENS) if with_image_tokens else [])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    bos_id = backend.token_to_id(BEGIN_OF_TEXT)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PAD_TOKEN if with_image_tokens else None,
        model_max_length=1 << 20,
    )
    if with_image_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_SPECIAL_TOKENS[:3])})
    return tokenizer
