"""Checkpoints in one process: a checkpoint counts only when its manifest verifies; resume skips a corrupt newest one
with a warning naming the bad file; a full disk gives a clear error and keeps the last good checkpoint; pruning keeps
K; export_checkpoint.py turns any accelerate state layout into a folder `from_pretrained` loads."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import fresh_accelerate_state

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from train_lib.checkpoints import (
    MANIFEST,
    PARTIAL_PREFIX,
    TRAINER_STATE,
    CheckpointDiskFullError,
    CheckpointSaveError,
    CorruptCheckpointError,
    complete_checkpoints,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
    step_folders,
)

# The DCP layouts below are written by one process, as a stand-in for FSDP2's ranks.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    with fresh_accelerate_state():
        yield Accelerator(cpu=True)


def prepared_linear(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return accelerator.prepare(model, optimizer, scheduler)


def train_step(model, optimizer, scheduler):
    model(torch.randn(2, 8)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def save_steps(accelerator, output_dir, steps, keep=0):
    model, optimizer, scheduler = prepared_linear(accelerator)
    for step in steps:
        train_step(model, optimizer, scheduler)
        save_checkpoint(accelerator, str(output_dir), step, {"step": step}, keep)
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """An output folder with complete step-1 and step-2, to copy and damage."""
    from accelerate import Accelerator

    output_dir = tmp_path_factory.mktemp("two-checkpoints")
    with fresh_accelerate_state():
        save_steps(Accelerator(cpu=True), output_dir, [1, 2])
    return output_dir


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "optimizer.bin": truncate,
    "model.safetensors": truncate,
    "scheduler.bin": lambda path: open(path, "w").close(),
    TRAINER_STATE: truncate,
    "random_states_0.pkl": os.remove,
    MANIFEST: truncate,
}


def test_a_save_leaves_a_step_folder_whose_manifest_lists_every_file(accelerator, tmp_path):
    save_steps(accelerator, tmp_path, [3])
    folder = tmp_path / "checkpoints" / "step-3"
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", TRAINER_STATE} <= on_disk
    assert all(entry["size"] == (folder / name).stat().st_size for name, entry in manifest["files"].items())
    assert os.listdir(tmp_path / "checkpoints") == ["step-3"]
    assert load_trainer_state(str(folder)) == {"step": 3}


@pytest.mark.parametrize("bad_file", list(CORRUPTIONS))
def test_latest_skips_a_corrupt_newest_checkpoint_with_a_warning_naming_the_file(two_checkpoints, tmp_path, caplog,
                                                                                   bad_file):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "checkpoints"
    CORRUPTIONS[bad_file](root / "step-2" / bad_file)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", str(tmp_path)) == str(root / "step-1")
    assert bad_file in caplog.text and "step-2" in caplog.text
    assert complete_checkpoints(str(tmp_path)) == [str(root / "step-1")]


@pytest.mark.parametrize("bad_file", ["optimizer.bin", MANIFEST])
def test_an_explicit_corrupt_checkpoint_raises_an_error_naming_the_file(two_checkpoints, tmp_path, bad_file):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    step_2 = tmp_path / "checkpoints" / "step-2"
    CORRUPTIONS[bad_file](step_2 / bad_file)
    with pytest.raises(CorruptCheckpointError, match=f"step-2 is not a complete checkpoint: {bad_file}"):
        resolve_resume(str(step_2), str(tmp_path))


def test_a_step_folder_without_a_manifest_is_not_a_checkpoint(two_checkpoints, tmp_path):
    """What a rename before every rank finished used to leave: the folder, some files, no manifest."""
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    (tmp_path / "checkpoints" / "step-2" / MANIFEST).unlink()
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoints" / "step-1")


def test_resume_restores_the_weights_and_the_optimizer_bit_for_bit(accelerator, tmp_path):
    trained = save_steps(accelerator, tmp_path, [1])
    model, optimizer, _ = trained
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(*trained)  # moves on; the load must bring back step 1
    accelerator.load_state(resolve_resume("latest", str(tmp_path)))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_pruning_keeps_the_newest_k(accelerator, tmp_path):
    save_steps(accelerator, tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4", "step-5"]
    assert [step for step, _ in step_folders(str(tmp_path))] == [4, 5]


def test_a_partial_folder_left_by_a_killed_save_is_ignored_then_removed(accelerator, tmp_path):
    save_steps(accelerator, tmp_path, [1])
    leftover = tmp_path / "checkpoints" / f"{PARTIAL_PREFIX}step-2"
    shutil.copytree(tmp_path / "checkpoints" / "step-1", leftover)
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoints" / "step-1")
    save_steps(accelerator, tmp_path, [3])
    assert not leftover.exists()


def failing_save(error):
    """accelerate's writer that fills half the file, then fails the way a full disk does."""

    def save(obj, path, **kwargs):
        if str(path).endswith("optimizer.bin"):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise error
        torch.save(obj, path)

    return save


class SafetensorError(Exception):
    pass


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4310"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
], ids=["ENOSPC", "torch-unexpected-pos", "safetensors"])
def test_a_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(accelerator, tmp_path, monkeypatch, error):
    import accelerate.checkpointing

    trained = save_steps(accelerator, tmp_path, [1], keep=1)
    monkeypatch.setattr(accelerate.checkpointing, "save", failing_save(error))
    train_step(*trained)
    with pytest.raises(CheckpointDiskFullError, match=r"disk full while saving checkpoint .*step-2: .* free") as err:
        save_checkpoint(accelerator, str(tmp_path), 2, {"step": 2}, keep=1)
    assert err.value.errno == errno.ENOSPC and "step-1" in str(err.value)
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]  # no partial folder, step-1 not pruned
    assert complete_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoints" / "step-1")]


def test_another_save_failure_names_the_error_and_cleans_up(accelerator, tmp_path, monkeypatch):
    import accelerate.checkpointing

    save_steps(accelerator, tmp_path, [1])
    monkeypatch.setattr(accelerate.checkpointing, "save", failing_save(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(CheckpointSaveError, match="rank 0: PermissionError"):
        save_checkpoint(accelerator, str(tmp_path), 2, {"step": 2}, keep=0)
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]


# Export: a tiny Llama3Siglip2 with tied embeddings, as the training script builds it from scratch.


@pytest.fixture(scope="module")
def scratch_model_and_processor():
    from train_lib.arguments import ModelArguments
    from train_lib.model_factory import build_scratch_model, scratch_tokenizer_corpus

    args = ModelArguments(text_hidden_size=32, text_intermediate_size=64, text_heads=2, text_kv_heads=1,
                          vision_hidden_size=16, vision_intermediate_size=32, vision_heads=2, max_patches=16)
    torch.manual_seed(0)
    return build_scratch_model(args, scratch_tokenizer_corpus())


def write_dcp(partial, model):
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(os.path.join(partial, "pytorch_model_fsdp_0"))
    dcp.save({"model": model.state_dict()}, storage_writer=writer)


LAYOUTS = {
    # What accelerate's save_state writes for FSDP2 SHARDED_STATE_DICT and FULL_STATE_DICT, in one process.
    "fsdp-sharded-dcp": write_dcp,
    "fsdp-full": lambda partial, model: torch.save(model.state_dict(), os.path.join(partial,
                                                                                   "pytorch_model_fsdp.bin")),
}


def save_model_checkpoint(accelerator, output_dir, model, processor, layout=None, monkeypatch=None):
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    if layout:
        monkeypatch.setattr(accelerator, "save_state", lambda folder, **kwargs: LAYOUTS[layout](folder, model))
    return save_checkpoint(accelerator, str(output_dir), 7, {"step": 7}, 1, model_config=model.config,
                           generation_config=model.generation_config, processor=processor)


def assert_same_weights(exported_folder, model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = AutoModelForImageTextToText.from_pretrained(exported_folder)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert AutoProcessor.from_pretrained(exported_folder).image_token is not None


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
def test_export_makes_a_folder_from_pretrained_loads_with_the_same_weights(accelerator, tmp_path, monkeypatch, layout,
                                                                          scratch_model_and_processor):
    from export_checkpoint import main

    model, processor = scratch_model_and_processor
    checkpoint = save_model_checkpoint(accelerator, tmp_path / "run", model, processor, layout, monkeypatch)
    main([checkpoint, "--out", str(tmp_path / "export")])
    assert_same_weights(tmp_path / "export", model)


def test_the_documented_export_command_runs_as_a_script(accelerator, tmp_path, monkeypatch,
                                                        scratch_model_and_processor):
    """`python examples/export_checkpoint.py CHECKPOINT --out FOLDER --dtype bfloat16`, run in this process (runpy):
    a fresh interpreter would spend most of the test importing torch and transformers again."""
    import runpy

    from transformers import AutoModelForImageTextToText

    model, processor = scratch_model_and_processor
    checkpoint = save_model_checkpoint(accelerator, tmp_path / "run", model, processor)
    monkeypatch.setattr(sys, "argv", ["export_checkpoint.py", checkpoint, "--out", str(tmp_path / "export"),
                                      "--dtype", "bfloat16"])
    runpy.run_path(str(EXAMPLES / "export_checkpoint.py"), run_name="__main__")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_export_refuses_a_corrupt_checkpoint(accelerator, tmp_path, scratch_model_and_processor):
    from export_checkpoint import main

    model, processor = scratch_model_and_processor
    checkpoint = save_model_checkpoint(accelerator, tmp_path / "run", model, processor)
    truncate(os.path.join(checkpoint, "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is .* bytes"):
        main([checkpoint, "--out", str(tmp_path / "export")])


def test_export_refuses_dcp_metadata_that_would_run_code(accelerator, tmp_path, monkeypatch,
                                                         scratch_model_and_processor):
    import pickle

    from export_checkpoint import ExportError, main

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    def poisoned_dcp(partial, model):
        write_dcp(partial, model)
        with open(os.path.join(partial, "pytorch_model_fsdp_0", ".metadata"), "wb") as f:
            pickle.dump(RunsCode(), f)

    model, processor = scratch_model_and_processor
    monkeypatch.setitem(LAYOUTS, "poisoned", poisoned_dcp)
    checkpoint = save_model_checkpoint(accelerator, tmp_path / "run", model, processor, "poisoned", monkeypatch)
    with pytest.raises(ExportError, match=r"\.metadata is not plain DCP metadata.*getcwd"):
        main([checkpoint, "--out", str(tmp_path / "export")])


def test_export_of_a_deepspeed_checkpoint_without_deepspeed_points_to_zero_to_fp32(accelerator, tmp_path, monkeypatch,
                                                                                   scratch_model_and_processor):
    from export_checkpoint import ExportError, main

    # Not installed, as far as any import can tell, even where an earlier test imported its modules.
    for name in ["deepspeed", *(name for name in sys.modules if name.startswith("deepspeed."))]:
        monkeypatch.setitem(sys.modules, name, None)

    def deepspeed_layout(partial, model):  # what DeepSpeed's engine.save_checkpoint leaves, in outline
        os.makedirs(os.path.join(partial, "pytorch_model"))
        Path(partial, "pytorch_model", "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
        Path(partial, "zero_to_fp32.py").write_text("# DeepSpeed's converter\n")
        Path(partial, "latest").write_text("pytorch_model")

    model, processor = scratch_model_and_processor
    monkeypatch.setitem(LAYOUTS, "deepspeed", deepspeed_layout)
    checkpoint = save_model_checkpoint(accelerator, tmp_path / "run", model, processor, "deepspeed", monkeypatch)
    with pytest.raises(ExportError, match=r"DeepSpeed ZeRO checkpoint.*pip install deepspeed.*zero_to_fp32\.py"):
        main([checkpoint, "--out", str(tmp_path / "export")])
