"""Turning text and images into model inputs: image decoding, the image processor, the processor, the packing
collator, a test tokenizer. The data pipeline (`processing.data`, which needs datasets and torchdata) is imported
on its own, not from here.

The processor classes are also re-exported (and registered with transformers' Auto classes against the model
config) by `modeling_llama3_siglip2`.
"""

from .collator import MultimodalPackingCollator, PackingStats, pack_samples
from .image_loading import MAX_IMAGE_PIXELS, InvalidImageError, load_image
from .image_processing_llama3_siglip2 import Llama3Siglip2ImageProcessor, patchify, smart_resize
from .processing_llama3_siglip2 import (
    BEGIN_OF_IMAGE_TOKEN,
    DEFAULT_CHAT_TEMPLATE,
    END_OF_IMAGE_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    Llama3Siglip2Processor,
)
from .tokenizer import build_byte_level_bpe_tokenizer

__all__ = [
    "BEGIN_OF_IMAGE_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "END_OF_IMAGE_TOKEN",
    "IMAGE_TOKEN",
    "MAX_IMAGE_PIXELS",
    "PAD_TOKEN",
    "InvalidImageError",
    "Llama3Siglip2ImageProcessor",
    "Llama3Siglip2Processor",
    "MultimodalPackingCollator",
    "PackingStats",
    "build_byte_level_bpe_tokenizer",
    "load_image",
    "pack_samples",
    "patchify",
    "smart_resize",
]
