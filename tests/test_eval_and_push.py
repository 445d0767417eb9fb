"""Held-out evaluation, the model card, the LoRA base in final/, and the push to the Hub: on CPU, never on the network.

The Hub is mocked wherever a test would reach it (`train_lib.hub`'s imported functions, `HfApi.whoami`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from tests.conftest import fresh_accelerate_state

from .test_train import TINY, child_env, run_in_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from train_lib import hub, model_card
from train_lib.arguments import parse_arguments
from train_lib.evaluation import Evaluator, patches_to_image, prompts_from_batch
from train_lib.model_card import write_model_card
from train_lib.model_factory import build_model_and_processor

# A held-out scenes split small enough to read whole: with 64-token rows each batch holds one sample.
EVAL = ["--eval_split", "eval", "--scenes_size", "5", "--seq_len", "64", "--eval_samples", "0",
        "--eval_generate_samples", "2", "--eval_max_new_tokens", "4"]


@pytest.fixture
def fresh_accelerate():
    with fresh_accelerate_state():
        yield


def tiny_run_args(*extra):
    return parse_arguments([*TINY, *EVAL, *map(str, extra)])


@pytest.fixture(scope="module")
def tiny_model():
    model_args, _, _ = tiny_run_args()
    torch.manual_seed(0)
    return build_model_and_processor(model_args)


def make_evaluator(accelerator, processor, *extra):
    model_args, data_args, train_args = tiny_run_args(*extra)
    return Evaluator(model_args, data_args, train_args, processor, accelerator)


# ----------------------------------------------------------------------------------------------- evaluation


def test_eval_loss_is_the_mean_cross_entropy_over_every_target_token(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    model, processor = tiny_model
    accelerator = Accelerator(cpu=True)
    evaluator = make_evaluator(accelerator, processor)
    loss, targets, samples, _ = evaluator.eval_loss(model, accelerator)

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in evaluator.loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                             reduction="sum", ignore_index=-100))
            count += int((labels != -100).sum())
    assert samples == 5 and targets == count
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_eval_is_repeatable_and_leaves_the_model_training(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    model, processor = tiny_model
    accelerator = Accelerator(cpu=True)
    evaluator = make_evaluator(accelerator, processor)
    model.train()
    first = evaluator.eval_loss(model, accelerator)[0]
    assert model.training
    assert evaluator.eval_loss(model, accelerator)[0] == first


def test_eval_samples_caps_the_samples_scored(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    model, processor = tiny_model
    accelerator = Accelerator(cpu=True)
    # Rows of 256 tokens hold several samples each: the cap must cut inside a batch.
    evaluator = make_evaluator(accelerator, processor, "--eval_samples", 3, "--seq_len", 256)
    _, _, samples, _ = evaluator.eval_loss(model, accelerator)
    assert samples == 3


def test_maybe_evaluate_runs_every_n_steps_only(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    model, processor = tiny_model
    accelerator = Accelerator(cpu=True)
    evaluator = make_evaluator(accelerator, processor, "--eval_every", 2, "--eval_generate_samples", 0)
    assert evaluator.maybe_evaluate(1, model, accelerator) is None
    figures = evaluator.maybe_evaluate(2, model, accelerator)
    assert figures["eval_samples"] == 5 and figures["eval_loss"] > 0


def test_eval_every_without_a_held_out_set_is_refused(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    model_args, data_args, train_args = parse_arguments([*TINY, "--eval_every", "10"])
    with pytest.raises(ValueError, match="--eval_split"):
        Evaluator(model_args, data_args, train_args, tiny_model[1], Accelerator(cpu=True))


def test_a_scenes_prompt_is_the_image_and_its_reference_the_caption(tiny_model, fresh_accelerate):
    from accelerate import Accelerator

    from processing.scenes import ScenesSource

    _, processor = tiny_model
    evaluator = make_evaluator(Accelerator(cpu=True), processor)
    batch = next(iter(evaluator.loader))
    (prompt,) = prompts_from_batch(batch, processor)
    source = ScenesSource("eval", 5, 0)
    # The caption of each sample's first scene (some samples show several); packing may reorder samples.
    captions = {source[i]["text"].split(processor.image_token)[1] for i in range(5)}
    assert prompt["reference"] in captions
    assert prompt["inputs"]["input_ids"][0, -1] == processor.eoi_token_id
    assert prompt["prompt"].endswith(processor.image_token)


def test_a_chat_prompt_stops_where_the_assistant_answer_starts(tiny_model):
    from processing.collator import MultimodalPackingCollator

    _, processor = tiny_model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red box and a blue box"}]}]
    sample = processor.build_sft_sample(messages, images=[Image.new("RGB", (64, 32), "red")])
    batch = MultimodalPackingCollator.from_processor(processor, 256)([sample])
    (prompt,) = prompts_from_batch(batch, processor)
    assert prompt["reference"].strip() == "a red box and a blue box"
    assert "What is it?" in prompt["prompt"] and "red box" not in prompt["prompt"]


def test_the_logged_image_is_the_image_the_model_saw(tiny_model):
    _, processor = tiny_model
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 96, 3), dtype=np.uint8)
    inputs = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    h, w = inputs["spatial_shapes"][0].tolist()
    ip = processor.image_processor
    shown = patches_to_image(inputs["pixel_values"][0], h, w, ip.patch_size, ip.image_mean, ip.image_std)
    resized = np.asarray(Image.fromarray(pixels).resize((w * ip.patch_size, h * ip.patch_size),
                                                        resample=ip.resample))
    assert shown.shape == resized.shape
    assert np.abs(shown.astype(int) - resized.astype(int)).max() <= 1


def test_eval_loss_generations_and_images_reach_tensorboard(tiny_model, fresh_accelerate, tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, processor = tiny_model
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    evaluator = make_evaluator(accelerator, processor, "--eval_every", 2)
    figures = evaluator.maybe_evaluate(2, model, accelerator)
    accelerator.end_training()

    (run_dir,) = {os.path.dirname(p) for p in map(str, tmp_path.rglob("events.out.tfevents.*"))}
    events = EventAccumulator(run_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    (scalar,) = events.Scalars("eval_loss")
    assert scalar.step == 2 and scalar.value == pytest.approx(figures["eval_loss"], rel=1e-6)
    text = events.Tensors("eval/sample_0/text_summary")[0]
    assert text.step == 2
    logged = text.tensor_proto.string_val[0].decode()
    assert figures["eval_generations"][0]["reference"] in logged and "**generated**" in logged
    (image,) = events.Images("eval/sample_0/image")
    height, width = next(iter(evaluator.loader))["spatial_shapes"][0].tolist()
    patch = processor.image_processor.patch_size
    assert (image.step, image.height, image.width) == (2, height * patch, width * patch)
    assert "eval/sample_1/image" in events.Tags()["images"]


DISTRIBUTED_EVAL = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from train_lib.arguments import parse_arguments
    from train_lib.evaluation import Evaluator
    from train_lib.model_factory import build_model_and_processor

    out, argv = sys.argv[1], sys.argv[2:]
    model_args, data_args, train_args = parse_arguments(argv)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, processor = build_model_and_processor(model_args)
    model = accelerator.prepare(model)
    figures = Evaluator(model_args, data_args, train_args, processor, accelerator).maybe_evaluate(1, model, accelerator)
    with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(figures, f)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_uneven_eval_shards_give_the_one_process_eval_loss(tmp_path):
    """5 held-out samples over 2 ranks: 3 batches on rank 0, 2 on rank 1. No hang, and the same loss as 1 process."""
    script = tmp_path / "distributed_eval.py"
    script.write_text(DISTRIBUTED_EVAL)
    args = [*TINY, *EVAL, "--eval_every", "1"]
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(free_port())]
        run = subprocess.run([*launcher, str(script), str(out), *args], env=child_env(), capture_output=True,
                             text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        results[processes] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    (one,), (rank0, rank1) = results[1], results[2]
    assert rank0["eval_loss"] == rank1["eval_loss"]
    assert rank0["eval_samples"] == one["eval_samples"] == 5
    assert rank0["eval_target_tokens"] == one["eval_target_tokens"]
    assert rank0["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert len(rank0["eval_generations"]) == 2 and rank1["eval_generations"] == []  # generated by the main process


# ----------------------------------------------------------------------------------------------- model card


def fake_report(**overrides):
    report = {"steps": 30, "samples_seen": 600, "tokens_seen": 12345, "wall_seconds": 90.0, "train_loss_first": 5.8,
              "train_loss_last": 1.234, "skipped_steps": 0, "skipped": {}, "eval_loss": 1.5, "eval_samples": 5,
              "eval_target_tokens": 60, "eval_exact_match": 0.75, "eval_exact_match_blank_images": 0.05,
              "eval_generations": [{"prompt": "<|image|>", "generated": "a red box", "reference": "a red box"}]}
    return {**report, **overrides}


def card_for(final_dir, argv, report=None):
    model_args, data_args, train_args = parse_arguments([str(a) for a in argv])
    return ModelCard.load(write_model_card(str(final_dir), model_args, data_args, train_args, report or fake_report()))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_model):
    """A tiny model's final/ as save_pretrained leaves it (with the model class's static card)."""
    folder = tmp_path_factory.mktemp("final")
    model, processor = tiny_model
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_card_replaces_the_static_one_and_carries_hub_metadata(saved_tiny, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(saved_tiny, final)
    card = card_for(final, ["--push_to_hub", "you/tiny-vlm", "--license", "apache-2.0"])
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0" and "llama3-siglip2" in card.data.tags
    assert card.data.base_model is None and card.data.datasets is None  # from scratch, on the embedded scenes
    assert "trained from scratch" in card.text
    for figure in ("30", "1.234", "12,345", "75.0 %", "5.0 %", "| 1.5 |", "you/tiny-vlm"):
        assert figure in card.text, figure


def test_the_card_inherits_base_models_and_licence_from_the_bases_cards(tmp_path, tiny_llama_dir, tiny_siglip2_dir):
    text, vision = tmp_path / "llama", tmp_path / "siglip2"
    shutil.copytree(tiny_llama_dir, text)
    shutil.copytree(tiny_siglip2_dir, vision)
    (text / "README.md").write_text("---\nlicense: llama3.2\nbase_model: meta-llama/Llama-3.2-1B\n---\n")
    (vision / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    (tmp_path / "final").mkdir()
    argv = ["--text_model", text, "--vision_model", vision, "--dataset", "pixparse/cc12m-wds"]
    card = card_for(tmp_path / "final", argv)
    assert card.data.base_model == ["meta-llama/Llama-3.2-1B"]  # local folders are not hub ids; their bases are
    assert card.data.license == "other" and "llama3.2" in card.text and "apache-2.0" in card.text
    assert card.data.datasets == ["pixparse/cc12m-wds"]

    (vision / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    assert card_for(tmp_path / "final", argv).data.license == "llama3.2"


def test_a_hub_base_model_licence_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    readme = tmp_path / "cached-README.md"
    readme.write_text("---\nlicense: apache-2.0\n---\n")
    asked = []
    monkeypatch.setattr(model_card, "try_to_load_from_cache", lambda repo, name: asked.append(repo) or str(readme))
    (tmp_path / "final").mkdir()
    card = card_for(tmp_path / "final", ["--text_model", "org/text", "--vision_model", "org/vision",
                                         "--dataset", "parquet", "--data_files", "x.parquet"])
    assert asked == ["org/text", "org/vision"]
    assert card.data.base_model == ["org/text", "org/vision"] and card.data.license == "apache-2.0"
    assert card.data.datasets is None  # a builder, not a hub data set


def test_the_card_usage_code_runs_on_the_local_final_folder(saved_tiny, tmp_path, monkeypatch):
    final = tmp_path / "final"
    shutil.copytree(saved_tiny, final)
    card = card_for(final, [])
    code = card.text.split("```python\n")[1].split("```")[0]
    assert str(final.resolve()) in code
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "usage", "exec"), {})  # noqa: S102 - the card's own snippet, as a reader would run it


# ----------------------------------------------------------------------------------------------- LoRA base


LORA = ["--max_steps", 4, "--use_lora", "true", "--lora_r", 4, "--learning_rate", 1e-2, "--save_merged_lora", "true"]


def test_lora_from_scratch_saves_its_base_so_final_alone_loads_in_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "run"
    run_in_process("--output_dir", run, *LORA)
    moved = tmp_path / "elsewhere"
    shutil.copytree(run / "final", moved)  # nothing outside final/ is needed
    shutil.rmtree(run)
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"

    base = AutoModelForImageTextToText.from_pretrained(moved / config["base_model_name_or_path"]).eval()
    AutoProcessor.from_pretrained(moved / "base")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, moved).eval()
        adapter_logits = adapted(input_ids=ids).logits
        merged_logits = AutoModelForImageTextToText.from_pretrained(moved / "merged").eval()(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits)
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)

    # The model card's usage code loads the adapter on that base too.
    card = card_for(moved, [*TINY, *LORA])
    assert card.data.library_name == "peft"
    code = card.text.split("```python\n")[1].split("```")[0]
    assert str(moved / "base") in code
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "usage", "exec"), {})  # noqa: S102 - the card's own snippet, as a reader would run it


# ----------------------------------------------------------------------------------------------- push


@pytest.fixture
def online(monkeypatch):
    """A machine with a token and the Hub switched on; any real network call fails the test."""
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")

    def no_network(*args, **kwargs):
        raise AssertionError("the test reached for the network")

    monkeypatch.setattr(hub, "create_repo", no_network)
    monkeypatch.setattr(hub, "upload_folder", no_network)
    monkeypatch.setattr(hub.HfApi, "whoami", no_network)
    return monkeypatch


def test_a_valid_target_with_a_token_passes_without_a_network_call(online):
    hub.check_push_target("you/my-vlm")


@pytest.mark.parametrize("repo_id", ["you/my vlm", "a/b/c", "you/my--vlm"])
def test_an_invalid_repo_id_fails_at_start_up(online, repo_id):
    with pytest.raises(hub.PushTargetError, match="not a valid repo id"):
        hub.check_push_target(repo_id)


def test_no_token_fails_at_start_up_and_says_how_to_log_in(online):
    online.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.PushTargetError, match="hf auth login"):
        hub.check_push_target("you/my-vlm")


def test_offline_mode_fails_at_start_up(online):
    online.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.PushTargetError, match="HF_HUB_OFFLINE"):
        hub.check_push_target("you/my-vlm")


@pytest.mark.parametrize(
    ("user", "message"),
    [({"name": "you", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, "read-only"),
     ({"name": "someone", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}, "not 'you'")],
)
def test_the_remote_check_refuses_a_token_that_cannot_write_there(online, user, message):
    online.setattr(hub.HfApi, "whoami", lambda self, token=None: user)
    with pytest.raises(hub.PushTargetError, match=message):
        hub.check_push_target("you/my-vlm", check_remote=True)


def test_the_remote_check_accepts_an_organisation_of_the_user(online):
    user = {"name": "someone", "orgs": [{"name": "you"}], "auth": {"accessToken": {"role": "write"}}}
    online.setattr(hub.HfApi, "whoami", lambda self, token=None: user)
    hub.check_push_target("you/my-vlm", check_remote=True)


def finished_run(tmp_path) -> Path:
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "report.json").write_text(json.dumps({"steps": 30, "eval_exact_match": 1.0}))
    return tmp_path


def test_a_failed_push_keeps_every_result_and_records_how_to_push_again(online, tmp_path, capsys):
    run = finished_run(tmp_path)

    def refused(*args, **kwargs):
        raise OSError("no network")

    online.setattr(hub, "create_repo", refused)
    outcome = hub.push_final(str(run), "you/my-vlm")
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 30 and report["eval_exact_match"] == 1.0  # what was there stays
    assert report["push"] == outcome and outcome["pushed"] is False and "no network" in outcome["error"]
    assert (run / "final" / "model.safetensors").read_bytes() == b"weights"
    final = str((run / "final").resolve())
    assert shlex.split(outcome["retry"]["cli"]) == ["hf", "upload", "you/my-vlm", final, "."]
    assert outcome["retry"]["cli"] in capsys.readouterr().err


def test_the_python_retry_command_uploads_the_final_folder(online, tmp_path):
    run = finished_run(tmp_path)
    online.setattr(hub, "create_repo", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    command = hub.push_final(str(run), "you/my-vlm")["retry"]["python"]
    calls = []
    import huggingface_hub

    online.setattr(huggingface_hub, "create_repo", lambda repo_id, exist_ok: calls.append(("create", repo_id)))
    online.setattr(huggingface_hub, "upload_folder", lambda repo_id, folder_path: calls.append((repo_id, folder_path)))
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    exec(argv[2], {})  # noqa: S102 - the command the message tells the user to run
    assert calls == [("create", "you/my-vlm"), ("you/my-vlm", str((run / "final").resolve()))]


def test_a_successful_push_uploads_final_and_is_recorded(online, tmp_path):
    run = finished_run(tmp_path)
    uploads = []
    online.setattr(hub, "create_repo", lambda repo_id, exist_ok: None)
    online.setattr(hub, "upload_folder", lambda **kwargs: uploads.append(kwargs) or SimpleNamespace(
        commit_url="https://huggingface.co/you/my-vlm/commit/abc"))
    outcome = hub.push_final(str(run), "you/my-vlm")
    assert uploads[0]["repo_id"] == "you/my-vlm" and uploads[0]["folder_path"] == str(run / "final")
    assert json.loads((run / "report.json").read_text())["push"] == outcome and outcome["pushed"] is True


# ----------------------------------------------------------------------------------------- through train.py


def test_a_push_without_a_token_fails_before_training(online, tmp_path):
    online.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.PushTargetError):
        run_in_process("--output_dir", tmp_path, "--max_steps", 2, "--push_to_hub", "you/my-vlm")
    assert not (tmp_path / "final").exists()


def test_a_run_whose_push_fails_still_has_its_report_card_and_final_folder(online, tmp_path):
    online.setattr(hub, "create_repo", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    run_in_process("--output_dir", tmp_path, "--max_steps", 2, "--push_to_hub", "you/my-vlm")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["push"]["pushed"] is False and "eval_exact_match" in report
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert ModelCard.load(tmp_path / "final" / "README.md").data.tags[0] == "llama3-siglip2"


def test_a_run_with_a_held_out_split_reports_its_eval_loss(tmp_path):
    report = run_in_process("--output_dir", tmp_path, "--max_steps", 2, "--eval_split", "eval", "--eval_every", 1,
                            "--eval_samples", 4)
    assert report["eval_loss"] > 0 and report["eval_samples"] == 4
