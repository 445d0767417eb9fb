"""ZeRO-3 as train.py prepares it (`train.prepare_for_zero3`): each decoder and encoder layer one DeepSpeed leaf module,
torch's `F.linear`. The same training as with DeepSpeed's defaults (per-submodule hooks, its own `F.linear`), with far
fewer fetches a step. Two processes on the CPU (DeepSpeed's CPU accelerator, gloo), one rank with an image in every
batch and one with text only. Compiled as train.py compiles them on GPUs, each graph is a whole layer. Also: when
train.py compiles under ZeRO-3, and the bucket sizes. ZeRO-3 so prepared trains as DDP does (fp32), with the chunked
loss too. A loss NaN on one rank, sent through ZeRO-2's or -3's backward, trains as skipping that backward did.
DeepSpeed is a test dependency; where it is missing, the tests are skipped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

pytest.importorskip("deepspeed")
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("zero3_leaf_worker.py")


def train_two_ranks(tmp_path: Path, leaf: bool, compile: bool = False,
                    options: tuple[str, ...] = ()) -> tuple[list[dict], torch.Tensor]:
    """`options`: the worker's other arguments (steps, optimizer, NaN loss)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"leaf{int(leaf)}_compile{int(compile)}{''.join(options)}.json"
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator communicates through gloo
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(WORKER), "--leaf", str(int(leaf)), "--compile", str(int(compile)), *options, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), load_file(f"{out}.safetensors")["weights"]


def test_leaf_layers_train_the_same_with_fewer_fetches(tmp_path):
    plain, plain_weights = train_two_ranks(tmp_path, leaf=False)
    leaf, leaf_weights = train_two_ranks(tmp_path, leaf=True)
    assert [r["leaves"] for r in leaf] == [4, 4]  # 2 decoder + 2 encoder layers
    for plain_rank, leaf_rank in zip(plain, leaf):
        torch.testing.assert_close(leaf_rank["losses"], plain_rank["losses"], rtol=1e-5, atol=0)
        # Every forward fetches fewer times: one fetch a layer instead of one a submodule.
        assert max(leaf_rank["fetches"]) < min(plain_rank["fetches"]) / 2, (leaf_rank, plain_rank)
    assert len({r["weights"] for r in leaf}) == 1  # the ranks agree on the gathered weights
    # SGD for 4 steps: gradients equal up to the order of float sums.
    torch.testing.assert_close(leaf_weights, plain_weights, rtol=0, atol=1e-6)
    assert (plain_weights != 0).any()


@pytest.mark.parametrize("chunked_loss", [False, True])
def test_zero3_as_train_py_prepares_it_trains_as_ddp_does(tmp_path, chunked_loss):
    """ZeRO-3 with train.py's preparation (leaf layers, the encoder whole on every rank, the tied embedding and
    `lm_head` sharded) against DDP on the same 2 ranks, batches, initial weights and clipping, in fp32: the same losses
    and weights up to the order of float sums. With the chunked loss, as on GPUs, `lm_head`'s weight is read in its
    own call under ZeRO-3's gather and its gradient meets the embedding's in the one tied weight."""
    options = ("--chunked_loss", str(int(chunked_loss)))
    zero3, zero3_weights = train_two_ranks(tmp_path, leaf=True, options=options)
    ddp, ddp_weights = train_two_ranks(tmp_path, leaf=False, options=(*options, "--backend", "ddp"))
    for zero3_rank, ddp_rank in zip(zero3, ddp):
        torch.testing.assert_close(zero3_rank["losses"], ddp_rank["losses"], rtol=1e-5, atol=0)
    assert zero3_weights.shape == ddp_weights.shape
    torch.testing.assert_close(zero3_weights, ddp_weights, rtol=0, atol=1e-6)
    assert ddp[0]["losses"][-1] < ddp[0]["losses"][0]


def test_leaf_layers_compile_whole_with_the_hooks_left_eager(tmp_path):
    """What `--compile true` does under ZeRO-3: each graph is a whole layer, with no break inside (traced, DeepSpeed's
    hooks cut every layer at each submodule), and the layers train as the eager ones do."""
    eager, eager_weights = train_two_ranks(tmp_path, leaf=True)
    compiled, compiled_weights = train_two_ranks(tmp_path, leaf=True, compile=True)
    for rank in compiled:
        # Whole layers: a decoder layer's 7 linear layers, an encoder layer's 6, in each graph; all of them torch's own
        # F.linear, as DeepSpeed's replacement read each weight's `ds_id`, and with torch 2.11 on 4 H200s dynamo then
        # guarded on the id and recompiled every layer until it gave up.
        graphs = rank["linears_per_graph"]
        assert graphs and {g["torch"] for g in graphs} <= {6, 7} and not any(g["deepspeed"] for g in graphs), graphs
        assert not [reason for reason in rank["recompiles"] if "ds_" in reason], rank["recompiles"]
    for eager_rank, compiled_rank in zip(eager, compiled):
        torch.testing.assert_close(compiled_rank["losses"], eager_rank["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled_weights, eager_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_loss_through_zeros_backward_trains_exactly_as_skipping_its_backward(tmp_path, stage):
    """The trainer under ZeRO-2 and -3 from DeepSpeed 0.19.8: a loss NaN on one rank goes through the backward,
    unchecked (the check cost an all-reduce and a host sync every micro-batch), and DeepSpeed's step, its norm not
    finite, leaves the weights and Adam's state as they were. Bit for bit the training of skipping that step's
    backward on every rank by the trainer's check, which it still makes where DeepSpeed's step would apply the NaN
    (`nonfinite_on_any_rank`; with one rank's loss NaN, a "min" reduce through accelerate summed and let it through);
    the steps after the NaN one train on."""
    import deepspeed

    if Version(deepspeed.__version__).release < (0, 19, 8):
        pytest.skip(f"DeepSpeed {deepspeed.__version__}'s ZeRO step applies non-finite gradients (0.19.8 skips them)")
    # Adam: its step count shows the skip. ZeRO-2 has no leaf layers.
    options = ("--stage", str(stage), "--steps", "5", "--nan_step", "2", "--optimizer", "adam")
    leaf = stage == 3
    through, through_weights = train_two_ranks(tmp_path, leaf, options=(*options, "--nan_mode", "backward"))
    skipped, skipped_weights = train_two_ranks(tmp_path, leaf, options=(*options, "--nan_mode", "skip"))
    assert [rank["losses"].index(None) if None in rank["losses"] else -1 for rank in through] == [-1, 2]
    # Exact: the same arithmetic in the same order, only the NaN step's backward differs.
    assert [rank["losses"] for rank in through] == [rank["losses"] for rank in skipped]
    assert [rank["skipped_steps"] for rank in through] == [1, 1]  # DeepSpeed's step skipped it
    assert [rank["skipped_steps"] for rank in skipped] == [0, 0]  # DeepSpeed's step never ran for it
    assert [rank["adam_steps"] for rank in through + skipped] == [[4]] * 4  # 5 steps, one skipped
    assert all(rank["deepspeed_skips_nonfinite_steps"] for rank in through + skipped)
    assert len({rank["weights"] for rank in through + skipped}) == 1
    assert torch.equal(through_weights, skipped_weights) and through_weights.isfinite().all()


def test_deepspeed_skips_nonfinite_steps_from_0_19_8_where_its_optimizer_checks(monkeypatch):
    """The trainer leaves out its check before the backward only where DeepSpeed's step skips a NaN itself: ZeRO-3,
    and ZeRO-1/2 when they take the gradient norm and, in bf16, check it (their defaults)."""
    from types import SimpleNamespace

    import deepspeed

    sys.path.insert(0, str(ROOT / "examples"))
    from train_lib.loop import deepspeed_skips_nonfinite_steps

    def engine(stage: int, **optimizer) -> SimpleNamespace:
        return SimpleNamespace(zero_optimization_stage=lambda: stage, optimizer=SimpleNamespace(**optimizer))

    checking = {"compute_grad_norm": True, "check_grad_overflow": True, "dtype": torch.bfloat16}
    for version, skips in [("0.19.6", False), ("0.19.8", True), ("0.19.8+cpu", True), ("0.20.0", True)]:
        monkeypatch.setattr(deepspeed, "__version__", version)
        assert deepspeed_skips_nonfinite_steps(engine(3)) is skips, version
        assert deepspeed_skips_nonfinite_steps(engine(2, **checking)) is skips, version
    assert not deepspeed_skips_nonfinite_steps(engine(2, **{**checking, "check_grad_overflow": False}))
    assert deepspeed_skips_nonfinite_steps(engine(1, **{**checking, "check_grad_overflow": False,
                                                        "dtype": torch.float32}))
    assert not deepspeed_skips_nonfinite_steps(engine(2, **{**checking, "compute_grad_norm": False}))
    assert not deepspeed_skips_nonfinite_steps(engine(0))  # an optimizer without the switches: the trainer checks
    monkeypatch.undo()
    installed = Version(deepspeed.__version__).release >= (0, 19, 8)
    assert deepspeed_skips_nonfinite_steps(engine(3)) is installed


@pytest.mark.parametrize("deepspeed_linear, compiled", [(None, True), (False, True), (True, False)])
def test_zero3_compiles_layers_on_gpu_unless_deepspeed_linear_is_asked_for(monkeypatch, deepspeed_linear, compiled):
    """train.py's default under ZeRO-3 on a GPU: layers compiled with DeepSpeed's hooks left eager; a DeepSpeed config
    asking for DeepSpeed's `F.linear` keeps them eager (compiled, they recompiled for every layer)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "examples"))
    import train
    from train_lib.arguments import TrainArguments

    calls = []
    monkeypatch.setattr(train, "compile_layers", lambda model, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(train, "compile_workers_through_sigterm", lambda: None)
    monkeypatch.setattr(train, "use_decoder_attention", lambda model, implementation: None)
    monkeypatch.setattr(train, "use_vision_attention", lambda model: None)
    zero_optimization = {} if deepspeed_linear is None else {"memory_efficient_linear": deepspeed_linear}
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config={"zero_optimization": zero_optimization})
    accelerator = SimpleNamespace(device=torch.device("cuda"), state=SimpleNamespace(deepspeed_plugin=plugin))
    vision = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    model = SimpleNamespace(config=SimpleNamespace(), model=SimpleNamespace(vision_tower=vision))
    train.use_fast_path(model, TrainArguments(), accelerator)
    assert calls == ([{"vision_shapes": "dynamic", "trace_hooks": False}] if compiled else [])


def test_zero3_sizes_follow_the_layers_unless_the_config_sets_them():
    """Bucket sizes a ZeRO-3 config leaves out or "auto" hold two layers (the largest leaf layer, here a decoder
    layer); the persistence threshold keeps the vision encoder's weights whole on every rank. "auto" (Hugging Face's
    templates) is filled too: accelerate would read `model.config.hidden_size`, which the composite config lacks, and
    refuse the config. Gradients skip DeepSpeed's contiguous bucket unless they are all-reduced from it. Sizes and
    switches a user set stay. DeepSpeed's fast leaf fetching, which trained this model wrongly on
    GPUs, is refused."""
    from accelerate.utils import DeepSpeedPlugin

    sys.path.insert(0, str(ROOT / "examples"))
    import train
    from train_lib.arguments import ModelArguments
    from train_lib.model_factory import build_scratch_model, scratch_tokenizer_corpus

    model_args = ModelArguments(text_hidden_size=32, text_intermediate_size=64, text_heads=2, text_kv_heads=1,
                                text_layers=2, vision_hidden_size=16, vision_intermediate_size=32, vision_heads=2,
                                vision_layers=1, max_patches=16)
    model, _ = build_scratch_model(model_args, scratch_tokenizer_corpus())
    decoder_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    encoder_layer = sum(p.numel() for p in model.model.vision_tower.encoder.layers[0].parameters())
    assert decoder_layer > encoder_layer
    largest_vision_weight = 16 * 32  # the encoder's MLP

    def prepared(zero: dict) -> dict:
        plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": "auto",
                                               "zero_optimization": {"stage": 3, **zero}})
        assert train.prepare_for_zero3(model, plugin.deepspeed_config) == 3  # 2 decoder + 1 encoder layer
        assert not any(plugin.is_auto(f"zero_optimization.{key}") for key in zero)
        return plugin.deepspeed_config["zero_optimization"]

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    expected = [2 * decoder_layer, 2 * decoder_layer, largest_vision_weight]
    unset = prepared({})
    assert [unset[key] for key in keys] == expected
    assert unset["memory_efficient_linear"] is False
    assert unset["contiguous_gradients"] is False  # the reduce-scatter concatenates the gradients itself
    assert prepared({"reduce_scatter": False})["contiguous_gradients"] is True  # the all-reduce reads the bucket
    assert prepared({"contiguous_gradients": True})["contiguous_gradients"] is True
    encoder_weights = [p.numel() for p in model.model.vision_tower.encoder.parameters()]
    assert max(encoder_weights) == largest_vision_weight  # every encoder weight stays whole on every rank
    assert [prepared(dict.fromkeys(keys, "auto"))[key] for key in keys] == expected
    assert prepared({"stage3_param_persistence_threshold": 777})["stage3_param_persistence_threshold"] == 777

    own = prepared({"reduce_bucket_size": 5, "memory_efficient_linear": True})
    assert own["reduce_bucket_size"] == 5 and own["stage3_prefetch_bucket_size"] == 2 * decoder_layer
    assert own["memory_efficient_linear"] is True

    with pytest.raises(ValueError, match="stage3_module_granularity_threshold"):
        prepared({"stage3_module_granularity_threshold": 1})
    assert prepared({"stage3_module_granularity_threshold": 0})["reduce_bucket_size"] == 2 * decoder_layer


@pytest.mark.parametrize("stage", [2, 3])
def test_deepcompile_is_refused_before_the_model_loads(monkeypatch, stage):
    """A DeepSpeed config asking for DeepCompile is refused with its key named, before any weights load: train.py
    never calls `engine.compile()`, so DeepSpeed would train without it. A config without it, or with it off, goes on
    to build the model."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "examples"))
    import train
    from train_lib.arguments import parse_arguments

    class ModelBuilt(Exception):
        pass

    def build_model(model_args):
        raise ModelBuilt

    monkeypatch.setattr(train, "build_model_and_processor", build_model)

    def build(deepspeed_config: dict):
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": {"stage": stage},
                                                                     **deepspeed_config})
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
        train.build_training(accelerator, *parse_arguments([]))

    with pytest.raises(ValueError, match="compile.deepcompile"):
        build({"compile": {"deepcompile": True}})
    for config in ({}, {"compile": {"deepcompile": False}}, {"compile": None}):
        with pytest.raises(ModelBuilt):
            build(config)
