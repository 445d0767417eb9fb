"""What a saved folder carries besides the weights and code: every Auto class in `auto_map`, and a model card that
survives `push_to_hub`.

Hub-travelling: imports only transformers, which brings huggingface_hub's `ModelCard`.
"""

import os

# A sentence of the card transformers makes for a repository that has none (`create_and_tag_model_card`).
TRANSFORMERS_TEMPLATE_MARK = "This model card has been automatically generated."

AUTO_MAP = {
    "AutoConfig": "configuration_llama3_siglip2.Llama3Siglip2Config",
    "AutoModel": "modeling_llama3_siglip2.Llama3Siglip2Model",
    "AutoModelForImageTextToText": "modeling_llama3_siglip2.Llama3Siglip2ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llama3_siglip2.Llama3Siglip2ForConditionalGeneration",
}

MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llama3-siglip2, vision-language]
---
# Llama3-SigLIP2

A vision-language model: a Llama 3 decoder, a SigLIP2 NaFlex vision encoder (native resolution and aspect ratio)
and an MLP projector, built with the `llama3-siglip2` package. The model code travels with the weights:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
inputs = processor(text="<|image|>Describe the image.", images=[image], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=32), skip_special_tokens=True))
```
"""


class SavedFolderMixin:
    """`save_pretrained` and the Hub upload of a `PreTrainedModel`, with the full `auto_map` and our model card."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus every Auto entry in `auto_map` and a short model card.

        transformers records only the saved class's own Auto class; `AutoModel.from_pretrained(folder,
        trust_remote_code=True)` needs the others too. A card already in the folder is kept.
        """
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        os.makedirs(save_directory, exist_ok=True)
        card = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and not os.path.exists(card):
            with open(card, "w") as f:
                f.write(MODEL_CARD)
        if os.path.exists(card):
            with open(card) as f:
                self._folder_model_card = (os.path.realpath(save_directory), f.read())
        super().save_pretrained(save_directory, *args, **kwargs)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """Upload as transformers does, with the folder's model card rather than transformers' empty one.

        `push_to_hub` (and `save_pretrained(push_to_hub=True)`) write transformers' card over README.md just before
        this upload: the repository's own card, or for a new repository an empty template. The template gives way
        to the folder's card (with the template's tags added); a repository's card gives way only to a card that
        someone wrote into the folder, not to the default one `save_pretrained` writes.
        """
        from transformers.utils.hub import ModelCard

        card_path = os.path.join(working_dir, "README.md")
        folder, folder_card = getattr(self, "_folder_model_card", (None, None))
        if folder == os.path.realpath(working_dir) and os.path.exists(card_path):
            with open(card_path) as f:
                transformers_card = ModelCard(f.read())
            is_template = TRANSFORMERS_TEMPLATE_MARK in transformers_card.text
            if is_template or folder_card != MODEL_CARD:
                card = ModelCard(folder_card)
                tags = list(card.data.tags or [])
                card.data.tags = tags + [t for t in (transformers_card.data.tags or []) if t not in tags]
                with open(card_path, "w") as f:
                    f.write(str(card))
        return super()._upload_modified_files(working_dir, *args, **kwargs)


__all__ = ["AUTO_MAP", "MODEL_CARD", "SavedFolderMixin"]
