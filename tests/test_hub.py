"""save_pretrained / from_pretrained round-trips, and loading with trust_remote_code where the package is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from modeling_llama3_siglip2 import Llama3Siglip2ForConditionalGeneration, Llama3Siglip2Model

from .test_modeling import naflex_batch, sequence_with_images, text_ids

# Run in a child process: hide this package from the import system, then load the saved folder as a stranger would.
REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    class HideOurPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_llama3_siglip2", "processing"):
                raise ModuleNotFoundError(f"{name} is hidden for this test")
            return None

    sys.meta_path.insert(0, HideOurPackages())
    sys.path = [p for p in sys.path if p not in ("", ".") and "work/main" not in p]
    try:
        importlib.import_module("modeling_llama3_siglip2")
        raise SystemExit("the package is importable: the test would prove nothing")
    except ModuleNotFoundError:
        pass

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForImageTextToText

    folder, inputs_file, out_file = sys.argv[1:4]
    inputs = load_file(inputs_file)
    with torch.no_grad():
        full = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(full).__module__.startswith("transformers_modules"), type(full).__module__
        outputs = {
            "logits": full(**inputs).logits,
            "hidden": base(**inputs).last_hidden_state,
            "loss": full(**inputs, labels=inputs["input_ids"]).loss,
            "generated": full.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False),
        }
        save_file(outputs, out_file)

    if len(sys.argv) > 4:  # the folder has a processor too: transformers' pipeline, all from the folder's code
        from PIL import Image
        from transformers import pipeline

        generator = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        text = generator(images=Image.new("RGB", (40, 30), "red"), text=sys.argv[4], max_new_tokens=3)
        assert text[0]["generated_text"].startswith(sys.argv[4]), text
    """
)


def model_inputs(model):
    pv, mask, shapes = naflex_batch([(4, 6)], 64, 4, seed=3)
    ids = sequence_with_images(model.config, [text_ids(3, 1), text_ids(4, 2)], [24])
    return dict(input_ids=torch.tensor([ids]), pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)


def test_save_then_from_pretrained_gives_identical_logits_and_only_safetensors(built, tmp_path):
    model, _ = built
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files
    # The modeling file and every module it imports relatively travel with the weights.
    travelling = {"configuration_llama3_siglip2.py", "modeling_llama3_siglip2.py", "compat.py", "efficient_ops.py",
                  "host_layout.py", "saved_folder.py"}
    assert travelling | {"README.md"} <= files, files

    inputs = model_inputs(model)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Llama3Siglip2ForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_saved_config_maps_every_auto_class(built, tmp_path):
    model, _ = built
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"}
    assert "AutoModelForImageTextToText" in (tmp_path / "README.md").read_text()


def test_auto_classes_resolve_to_ours(built, tmp_path):
    model, _ = built
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llama3_siglip2"
    assert type(AutoModel.from_pretrained(tmp_path)) is Llama3Siglip2Model
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is Llama3Siglip2ForConditionalGeneration


def test_trust_remote_code_load_without_the_package_gives_the_same_outputs(built, tmp_path):
    """Forward, loss, generate and the pipeline, from the folder's code alone, under this transformers."""
    model, processor = built
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = model_inputs(model)
    save_file(inputs, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "out.safetensors"), "<|image|>Describe the image."],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(**inputs).logits, atol=0, rtol=0)
        torch.testing.assert_close(remote["hidden"], model.model(**inputs).last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(remote["loss"], model(**inputs, labels=inputs["input_ids"]).loss, atol=0, rtol=0)
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert remote["generated"].tolist() == generated.tolist()
