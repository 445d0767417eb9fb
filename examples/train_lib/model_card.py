"""The model card of a run: `final/README.md`, written from what the run actually did, after `save_pretrained`.

Metadata (the Hub's YAML header): base_model, datasets, license, pipeline_tag, tags, library_name. The body: the base
models (or "from scratch"), the data, the training figures, the evaluation, the licence and a usage snippet with the
repo id the run pushes to (or the local folder).

Nothing here touches the network. A base model's licence and own base models come from its card: the folder's
README.md, or for a hub id the copy in the local Hugging Face cache if there is one; otherwise `--license` says it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from huggingface_hub import ModelCard, ModelCardData, metadata_load, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .reporting import LORA_BASE_FOLDER

TAGS = ["llama3-siglip2", "vision-language", "image-text-to-text", "llama-3", "siglip2"]


@dataclass
class BaseModel:
    role: str  # what the run took from it: "text", "vision", or "starting point"
    name: str  # hub id or folder, as given
    license: str | None
    hub_ids: list[str]  # what the metadata may name: the id itself, or a local folder's own base models


def write_model_card(final_dir: str, model_args, data_args, train_args, report: dict) -> str:
    """Write `final_dir/README.md` (replacing the static card `save_pretrained` leaves); returns its path."""
    path = os.path.join(final_dir, "README.md")
    build_model_card(final_dir, model_args, data_args, train_args, report).save(path)
    return path


def build_model_card(final_dir: str, model_args, data_args, train_args, report: dict) -> ModelCard:
    bases = base_models(model_args)
    license, license_note = resolve_license(bases, train_args.license)
    lora = model_args.use_lora
    data = ModelCardData(
        base_model=sorted({hub_id for base in bases for hub_id in base.hub_ids}) or None,
        datasets=[data_args.dataset] if is_hub_dataset(data_args.dataset) else None,
        license=license,
        pipeline_tag="image-text-to-text",
        tags=TAGS + (["lora", "peft"] if lora else []),
        library_name="peft" if lora else "transformers",
    )
    where = train_args.push_to_hub or os.path.abspath(final_dir)
    sections = [
        f"# {train_args.push_to_hub or train_args.run_name}",
        "A vision-language model (Llama 3 decoder, SigLIP2 NaFlex encoder, MLP projector) trained with "
        "the `llama3-siglip2` package's `examples/train.py`"
        + (" as LoRA adapters on the language model (the projector trains fully)." if lora else "."),
        base_section(bases, model_args),
        data_section(data_args, report),
        training_section(model_args, data_args, train_args, report),
        evaluation_section(data_args, report),
        f"## Licence\n\n{license or 'Not set'}: {license_note}.",
        usage_section(where, model_args, is_hub=bool(train_args.push_to_hub)),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def base_models(model_args) -> list[BaseModel]:
    if model_args.model_name_or_path:
        named = [("starting point", model_args.model_name_or_path)]
    else:
        named = [(role, name) for role, name in (("text", model_args.text_model), ("vision", model_args.vision_model))
                 if name]
    bases = []
    for role, name in named:
        metadata = card_metadata(name)
        hub_ids = [name] if is_hub_model(name) else as_list(metadata.get("base_model"))
        bases.append(BaseModel(role, name, metadata.get("license"), hub_ids))
    return bases


def card_metadata(name_or_path: str) -> dict:
    """The YAML header of a model's card: from its folder, or from the local Hub cache; {} when not found."""
    if os.path.isdir(name_or_path):
        readme = os.path.join(name_or_path, "README.md")
    elif is_hub_model(name_or_path):
        readme = try_to_load_from_cache(name_or_path, "README.md")
    else:
        readme = None
    if not isinstance(readme, str) or not os.path.isfile(readme):
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a card with a broken header says nothing we can use
        return {}


def resolve_license(bases: list[BaseModel], given: str | None) -> tuple[str | None, str]:
    """The licence for the metadata and a sentence saying where it comes from."""
    if given:
        return given, "set for this run (`--license`)"
    if not bases:
        return None, "a model trained from scratch inherits no licence; pass `--license` to set one"
    known = {base.license for base in bases if base.license}
    listed = ", ".join(f"{base.name}: {base.license or 'unknown'}" for base in bases)
    if len(known) == 1 and all(base.license for base in bases):
        return known.pop(), f"inherited from the base models ({listed})"
    if known:
        return "other", (f"the base models' licences differ or are partly unknown ({listed}); the model is bound "
                         "by each of them. Pass `--license` to name it")
    return None, f"the base models' cards were not found locally ({listed}); pass `--license` to set one"


def base_section(bases: list[BaseModel], model_args) -> str:
    if not bases:
        return ("## Base models\n\nNone: trained from scratch (random initialisation, a byte-level BPE tokenizer "
                "trained at start-up).")
    rows = "\n".join(f"| {base.role} | `{base.name}` | {base.license or 'unknown'} |" for base in bases)
    note = ""
    if not model_args.model_name_or_path:
        note = "\n\nThe projector and the image tokens' embeddings are new (not in either base model)."
    return f"## Base models\n\n| role | model | licence |\n| --- | --- | --- |\n{rows}{note}"


def data_section(data_args, report: dict) -> str:
    source = "the embedded `scenes` set (drawn in-process)" if data_args.dataset == "scenes" else f"`{data_args.dataset}`"
    details = [f"- data set: {source}, split `{data_args.split}`"]
    if data_args.dataset_config:
        details.append(f"- subset: `{data_args.dataset_config}`")
    if data_args.data_files:
        details.append(f"- files: `{data_args.data_files}`")
    details.append(f"- format: {data_args.data_format}" + (" (found from the columns)" if data_args.data_format == "auto"
                                                            else ""))
    details.append(f"- samples seen: {report.get('samples_seen', 0):,}, tokens seen: {report.get('tokens_seen', 0):,} "
                   f"(packed rows of {data_args.seq_len} tokens)")
    skipped = report.get("skipped") or {}
    if skipped:
        details.append("- skipped samples: " + ", ".join(f"{reason} {count}" for reason, count in skipped.items()))
    return "## Data\n\n" + "\n".join(details)


def training_section(model_args, data_args, train_args, report: dict) -> str:
    trains = (f"LoRA (r {model_args.lora_r}, alpha {model_args.lora_alpha}) on `{model_args.lora_target_modules}` "
              "of the language model, and the projector" if model_args.use_lora else f"`{model_args.train_parts}`")
    rows = [
        ("what trained", trains),
        ("steps", report.get("steps")),
        ("learning rate", (f"{train_args.learning_rate:g} ({train_args.lr_scheduler_type}, "
                           f"{train_args.warmup_steps} warm-up steps)")),
        ("batch per process", f"{data_args.rows_per_batch} rows × {train_args.gradient_accumulation_steps} micro-batches"),
        ("training loss, first → last", f"{fmt(report.get('train_loss_first'))} → {fmt(report.get('train_loss_last'))}"),
        ("tokens seen", f"{report.get('tokens_seen', 0):,}"),
        ("skipped (non-finite) steps", report.get("skipped_steps", 0)),
        ("wall time", f"{report.get('wall_seconds', 0) / 60:.1f} min"),
    ]
    return "## Training\n\n| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def evaluation_section(data_args, report: dict) -> str:
    rows = []
    if report.get("eval_loss") is not None:
        held_out = data_args.eval_data_files or data_args.dataset
        split = data_args.eval_split or "train"
        measure = (f"eval loss (`{held_out}`, split `{split}`, {report.get('eval_samples', 0)} samples, "
                   f"{report.get('eval_target_tokens', 0):,} target tokens)")
        rows.append((measure, fmt(report["eval_loss"])))
    names = {"eval_exact_match_before": "scenes exact match, before training",
             "eval_exact_match": "scenes exact match",
             "eval_exact_match_blank_images": "scenes exact match, every image blank (near chance if the model reads "
                                              "the image)"}
    for key, name in names.items():
        if report.get(key) is not None:
            rows.append((f"{name}, {data_args.eval_samples} held-out scenes", f"{100 * report[key]:.1f} %"))
    if not rows:
        return "## Evaluation\n\nNone in this run (see `--eval_split`, `--eval_data_files`)."
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    examples = report.get("eval_generations") or [
        {"generated": e["prediction"], "reference": e["caption"]} for e in report.get("eval_examples", [])]
    if examples:
        table += "\n\nGreedy generations on held-out samples:\n\n| generated | reference |\n| --- | --- |\n"
        table += "\n".join(f"| {cell(e['generated'])} | {cell(e['reference'])} |" for e in examples[:3])
    return "## Evaluation\n\n" + table


def usage_section(where: str, model_args, is_hub: bool) -> str:
    load = "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
    if model_args.use_lora:
        if model_args.model_name_or_path:
            base = f'AutoModelForImageTextToText.from_pretrained("{model_args.model_name_or_path}", trust_remote_code=True)'
        elif is_hub:
            base = (f'AutoModelForImageTextToText.from_pretrained("{where}", subfolder="{LORA_BASE_FOLDER}", '
                    "trust_remote_code=True)")
        else:
            base = (f'AutoModelForImageTextToText.from_pretrained("{os.path.join(where, LORA_BASE_FOLDER)}", '
                    "trust_remote_code=True)")
        load = f'{load}from peft import PeftModel\n\nbase = {base}\nmodel = PeftModel.from_pretrained(base, "{where}")\n'
    else:
        load += f'\nmodel = AutoModelForImageTextToText.from_pretrained("{where}", trust_remote_code=True)\n'
    code = (
        "from PIL import Image\n"
        f"{load}"
        f'processor = AutoProcessor.from_pretrained("{where}", trust_remote_code=True)\n'
        'inputs = processor(text=processor.image_token + "Describe the image.", images=[Image.open("photo.jpg")],\n'
        '                   return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=32)\n"
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    return f"## Use it\n\nThe model code travels with the weights (`trust_remote_code=True`).\n\n```python\n{code}\n```"


def is_hub_model(name: str) -> bool:
    """A hub id, not a local folder: `namespace/name` that is a valid repo id."""
    if os.path.exists(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_dataset(name: str) -> bool:
    """A data set the Hub can name (not `scenes`, a `datasets` builder such as parquet, or a local path)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return name != "scenes" and name not in _PACKAGED_DATASETS_MODULES and is_hub_model(name)


def as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"
