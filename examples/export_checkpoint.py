"""Turn a training checkpoint into a Hub-ready folder that `from_pretrained` loads, offline:

    python examples/export_checkpoint.py OUTPUT_DIR/checkpoints/step-N --out FOLDER [--dtype bfloat16]

The checkpoint must verify (its manifest) and carry `hf/` (config and processor files, written by `save_checkpoint`).
The weights come from whichever state accelerate wrote:
    * `model.safetensors` (one process, DDP): read with safetensors;
    * `pytorch_model_fsdp_0/` (FSDP SHARDED_STATE_DICT, a torch.distributed.checkpoint folder): read whole with DCP
      with DCP's `dcp_to_torch_save`; its `.metadata` is a pickle, so it is first unpickled with only DCP's own
      metadata classes allowed;
    * `pytorch_model_fsdp.bin` (FSDP FULL_STATE_DICT) or `pytorch_model.bin`: `torch.load(weights_only=True)`;
    * `pytorch_model/` (DeepSpeed ZeRO): DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (deepspeed must
      be installed; its reader unpickles the shards, so use it only on checkpoints you wrote), or the
      `zero_to_fp32.py` script DeepSpeed copies into the checkpoint.
The weights are loaded into the model class the config names (`from_pretrained(None, config=..., state_dict=...)`,
which reports missing and unexpected keys), and saved with `save_pretrained` next to the processor.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile

import torch
from train_lib.checkpoints import HF_FILES, verify_checkpoint

# What DCP's `.metadata` pickle may name: its own metadata classes, torch dtypes and sizes, and a path.
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # None: any name in the module (plain dataclasses)
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
# Prefixes that wrappers add to every key: DDP's `module.`, a whole-model torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ExportError(RuntimeError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = DCP_METADATA_GLOBALS.get(module, set())
        if allowed is not None and name not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")
        return super().find_class(module, name)


def read_dcp_model_state(folder: str, scratch: str) -> dict[str, torch.Tensor]:
    """A DCP checkpoint folder (as FSDP2 SHARDED_STATE_DICT writes it, `{"model": state_dict}`), whole, here."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    metadata = os.path.join(folder, ".metadata")
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
        raise ExportError(f"{metadata} is not plain DCP metadata, refusing to unpickle it: {error}") from error
    # DCP's public converter writes one torch.save file (the model's size, briefly), which we read back safely.
    with tempfile.TemporaryDirectory(dir=scratch) as temporary:
        whole = os.path.join(temporary, "model.pt")
        dcp_to_torch_save(folder, whole)
        state = torch.load(whole, map_location="cpu", weights_only=True)
    return state["model"] if set(state) == {"model"} else state


def read_deepspeed_model_state(checkpoint: str, out: str) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        script = os.path.join(checkpoint, "zero_to_fp32.py")
        raise ExportError(
            f"{checkpoint} is a DeepSpeed ZeRO checkpoint (pytorch_model/); gathering its shards needs deepspeed "
            f"(pip install deepspeed), or DeepSpeed's own converter: python {script} {checkpoint} {out} "
            f"--tag pytorch_model --safe_serialization, then copy {os.path.join(checkpoint, HF_FILES)}/* into {out}"
        ) from error
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="pytorch_model")


def read_model_state(checkpoint: str, out: str) -> dict[str, torch.Tensor]:
    """The model's full state dict from whichever layout accelerate's save_state wrote."""

    def at(name):
        return os.path.join(checkpoint, name)

    if os.path.isfile(at("model.safetensors")):
        from safetensors.torch import load_file

        return load_file(at("model.safetensors"))
    if os.path.isdir(at("pytorch_model_fsdp_0")):
        os.makedirs(out, exist_ok=True)
        return read_dcp_model_state(at("pytorch_model_fsdp_0"), scratch=out)
    for name in ("pytorch_model_fsdp.bin", "pytorch_model.bin"):
        if os.path.isfile(at(name)):
            return torch.load(at(name), map_location="cpu", weights_only=True)
    if os.path.isdir(at("pytorch_model")):
        return read_deepspeed_model_state(checkpoint, out)
    raise ExportError(f"{checkpoint} has no model state this tool reads (model.safetensors, pytorch_model_fsdp_0/, "
                      f"pytorch_model_fsdp.bin, pytorch_model.bin or DeepSpeed's pytorch_model/); it has "
                      f"{sorted(os.listdir(checkpoint))}")


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state, changed = {key[len(prefix):]: value for key, value in state.items()}, True
    return state


def export_checkpoint(checkpoint: str, out: str, dtype: str | None = None) -> str:
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig, AutoProcessor, GenerationConfig

    import modeling_llama3_siglip2  # noqa: F401 - registers our classes with the Auto classes

    verify_checkpoint(checkpoint)
    hf = os.path.join(checkpoint, HF_FILES)
    if not os.path.isfile(os.path.join(hf, "config.json")):
        raise ExportError(f"{checkpoint} has no {HF_FILES}/config.json: it was saved without model_config "
                          f"(save_checkpoint(..., model_config=model.config, processor=processor))")
    state = strip_wrapper_prefixes(read_model_state(checkpoint, out))
    if any("lora_" in key for key in state):
        raise ExportError(f"{checkpoint} holds a PEFT (LoRA) model; export its adapter from the run's final/ "
                          f"folder, or load the checkpoint in the training script and save it with peft")
    config = AutoConfig.from_pretrained(hf)
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]  # what AutoModelForImageTextToText would pick
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if problems or info.get("error_msgs"):
        details = "; ".join(f"{kind}: {sorted(keys)[:8]}" for kind, keys in problems.items())
        raise ExportError(f"the weights in {checkpoint} do not fit {type(model).__name__}: {details}"
                          f"{info.get('error_msgs') or ''}")
    if os.path.isfile(os.path.join(hf, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(hf)
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    has_processor = any(os.path.isfile(os.path.join(hf, name))
                        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"))
    if has_processor:
        AutoProcessor.from_pretrained(hf).save_pretrained(out)
    else:
        print(f"warning: {checkpoint} has no processor files in {HF_FILES}/; {out} has the model only",
              file=sys.stderr)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, OUTPUT_DIR/checkpoints/step-N")
    parser.add_argument("--out", required=True, help="the folder to write (config, weights, processor)")
    parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as trained)")
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.out, args.dtype)
    print(f"exported {args.checkpoint} to {args.out}")


if __name__ == "__main__":
    main()
