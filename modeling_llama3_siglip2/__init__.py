"""llama3-siglip2: a Llama 3 decoder, a SigLIP2 NaFlex vision encoder and an MLP projector, the Hugging Face way.

This package is the one public entry point. Importing it registers the model, config and processor classes with
transformers' Auto classes, and marks them for `save_pretrained` to copy their code next to the weights, so a saved
folder loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

# The real class: transformers < 5.23 exposes a torchvision-gated stand-in at the top level.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from processing import *
from processing import Llama3Siglip2ImageProcessor, Llama3Siglip2Processor
from processing import __all__ as _processing_all

from .builder import from_pretrained_components
from .configuration_llama3_siglip2 import Llama3Siglip2Config
from .modeling_llama3_siglip2 import (
    Llama3Siglip2ForConditionalGeneration,
    Llama3Siglip2Model,
    Llama3Siglip2PreTrainedModel,
)

AutoConfig.register(Llama3Siglip2Config.model_type, Llama3Siglip2Config, exist_ok=True)
AutoModel.register(Llama3Siglip2Config, Llama3Siglip2Model, exist_ok=True)
AutoModelForImageTextToText.register(Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(Llama3Siglip2Config, Llama3Siglip2ImageProcessor, exist_ok=True)
AutoProcessor.register(Llama3Siglip2Config, Llama3Siglip2Processor, exist_ok=True)

Llama3Siglip2Config.register_for_auto_class()
Llama3Siglip2Model.register_for_auto_class("AutoModel")
Llama3Siglip2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = _processing_all + [
    "Llama3Siglip2Config",
    "Llama3Siglip2PreTrainedModel",
    "Llama3Siglip2Model",
    "Llama3Siglip2ForConditionalGeneration",
    "from_pretrained_components",
]
