"""The training script's configuration: which defaults a run gets, what `--help` says, and the start-up summary.

The toy values of configs/default.yaml (lr 2e-3, 128-patch images, merge 2) belong to the default scenes job only; a
run that names its model starts from defaults meant for real models, and the patch budget comes from the encoder.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_lib.arguments import (
    DEFAULT_CONFIG,
    LEARNING_RATES,
    SECTIONS,
    parse_arguments,
)
from train_lib.model_factory import build_model_and_processor, parameter_counts
from train_lib.reporting import backend_name, describe_run, flops_per_token

COMPOSED = ["--text_model", "some/llama", "--vision_model", "some/siglip2"]


def test_every_field_has_help_text():
    missing = [f.name for section in SECTIONS for f in fields(section) if not f.metadata.get("help")]
    assert missing == []


def test_help_documents_config_and_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    text = capsys.readouterr().out
    assert "--config CONFIG" in text and "default.yaml" in text
    for section in SECTIONS:
        for f in fields(section):
            assert f"--{f.name}" in text, f.name


def test_without_a_model_the_toy_job_reads_default_yaml():
    model_args, _, train_args = parse_arguments([])
    assert train_args.config == DEFAULT_CONFIG
    assert (train_args.learning_rate, model_args.max_patches, model_args.spatial_merge_size) == (2e-3, 128, 2)
    assert train_args.output_dir == "outputs/default"


@pytest.mark.parametrize(
    "argv",
    [COMPOSED, ["--model_name_or_path", "outputs/base/final"], ["--model_name_or_path=outputs/base/final"],
     ["--model_name", "outputs/base/final"]],  # argparse's prefix matching names a model too
)
def test_a_run_that_names_its_model_gets_none_of_the_toy_values(argv):
    model_args, _, train_args = parse_arguments(argv)
    assert train_args.config is None
    assert train_args.learning_rate == LEARNING_RATES["fine-tune"]
    assert model_args.max_patches is None and model_args.spatial_merge_size is None  # the encoder's / the saved
    assert train_args.output_dir != "outputs/default"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(["--use_lora", "true"], LEARNING_RATES["lora"]), (["--train_parts", "projector"], LEARNING_RATES["projector"]),
     (["--learning_rate", "5e-6"], 5e-6)],
)
def test_the_default_learning_rate_follows_what_trains(extra, expected):
    _, _, train_args = parse_arguments([*COMPOSED, *extra])
    assert train_args.learning_rate == expected


def test_a_config_file_still_wins_over_the_real_model_defaults(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("learning_rate: 3.0e-5\nmax_patches: 512\n")
    model_args, _, train_args = parse_arguments(["--config", str(config), *COMPOSED])
    assert (train_args.learning_rate, model_args.max_patches, train_args.config) == (3e-5, 512, str(config))


def test_default_yaml_with_a_named_model_is_refused():
    with pytest.raises(ValueError, match="toy job"):
        parse_arguments(["--config", DEFAULT_CONFIG, *COMPOSED])


def test_a_composed_model_takes_its_patch_budget_from_the_encoder(tiny_llama_dir, tiny_siglip2_dir):
    model_args, _, _ = parse_arguments(["--text_model", str(tiny_llama_dir), "--vision_model", str(tiny_siglip2_dir)])
    model, processor = build_model_and_processor(model_args)
    assert processor.image_processor.max_patches == model.config.vision_config.num_patches == 64
    assert processor.image_processor.merge_size == model.config.spatial_merge_size == 1


@pytest.fixture(scope="module")
def saved_merge2_model(tmp_path_factory, tiny_llama_dir, tiny_siglip2_dir):
    from modeling_llama3_siglip2 import from_pretrained_components

    folder = tmp_path_factory.mktemp("saved-merge2")
    model, processor = from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_dir), spatial_merge_size=2,
                                                  max_patches=64)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_saved_model_keeps_its_processor_unless_the_run_sets_a_budget(saved_merge2_model):
    model_args, _, _ = parse_arguments(["--model_name_or_path", str(saved_merge2_model)])
    _, processor = build_model_and_processor(model_args)
    assert processor.image_processor.max_patches == 64
    model_args, _, _ = parse_arguments(["--model_name_or_path", str(saved_merge2_model), "--max_patches", "32"])
    _, processor = build_model_and_processor(model_args)
    assert processor.image_processor.max_patches == 32


def test_another_merge_for_a_saved_model_is_refused(saved_merge2_model):
    model_args, _, _ = parse_arguments(["--model_name_or_path", str(saved_merge2_model), "--spatial_merge_size", "1"])
    with pytest.raises(ValueError, match="spatial_merge_size 2"):
        build_model_and_processor(model_args)


def fake_accelerator(kind, processes=1, zero_stage=None, fsdp_version=None):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage),
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=state, device=torch.device("cpu"),
                           mixed_precision="no")


@pytest.mark.parametrize(
    ("accelerator", "name"),
    [(fake_accelerator(DistributedType.NO), "single process"),
     (fake_accelerator(DistributedType.MULTI_GPU, 8), "DDP"),
     (fake_accelerator(DistributedType.MULTI_CPU, 2), "DDP"),
     (fake_accelerator(DistributedType.FSDP, 8, fsdp_version=2), "FSDP2"),
     (fake_accelerator(DistributedType.DEEPSPEED, 8, zero_stage=2), "DeepSpeed ZeRO-2"),
     (fake_accelerator(DistributedType.DEEPSPEED, 8, zero_stage=3), "DeepSpeed ZeRO-3")],
)
def test_the_backend_is_named_in_words(accelerator, name):
    assert backend_name(accelerator) == name


def test_describe_run_says_single_process_not_the_enum():
    model_args, data_args, train_args = parse_arguments([])
    summary = describe_run(model_args, data_args, train_args, fake_accelerator(DistributedType.NO), 1e6, 1e6, None)
    assert "single process" in summary and "NO on" not in summary
    two = describe_run(model_args, data_args, train_args, fake_accelerator(DistributedType.MULTI_CPU, 2), 1e6, 1e6, None)
    assert "DDP (MULTI_CPU on 2 processes)" in two


def test_parameter_counts_see_through_zero3_partitioning():
    """ZeRO-3 leaves each rank an empty tensor and the full size in `ds_numel`; the counts must not drop to 0."""
    model_args, data_args, _ = parse_arguments(["--text_hidden_size", "64", "--text_intermediate_size", "128"])
    model, _ = build_model_and_processor(model_args)
    expected_counts, expected_flops = parameter_counts(model), flops_per_token(model, data_args.seq_len)
    for parameter in model.parameters():
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0, dtype=parameter.dtype)
    assert parameter_counts(model) == expected_counts
    assert flops_per_token(model, data_args.seq_len) == expected_flops
