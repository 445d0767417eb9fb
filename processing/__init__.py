"""Turning text and images into model inputs: image decoding, the image processor, the processor, a test tokenizer.

The processor classes are also re-exported (and registered with transformers' Auto classes against the model
config) by `modeling_llama3_siglip2`.
"""

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
    "InvalidImageError",
    "Llama3Siglip2ImageProcessor",
    "Llama3Siglip2Processor",
    "MAX_IMAGE_PIXELS",
    "PAD_TOKEN",
    "build_byte_level_bpe_tokenizer",
    "load_image",
    "patchify",
    "smart_resize",
]
