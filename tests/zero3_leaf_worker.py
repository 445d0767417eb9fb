"""One rank of tests/test_zero3_leaf_layers.py: a tiny VLM trained 4 steps under DeepSpeed ZeRO-3 (on the CPU through
DeepSpeed's CPU accelerator and gloo), prepared as train.py prepares it (`--leaf 1`: leaf layers, torch's `F.linear`,
the encoder's weights whole on every rank) or with DeepSpeed's defaults and every weight sharded. Rank 0's batches carry
an image, rank 1's are text only; `--compile 1` compiles the layers as train.py does under ZeRO-3 (to a backend that
records each graph's linear layers). Writes the losses, the DeepSpeed sub-module fetches, the graphs, dynamo's reasons
for recompiling, and a digest of the gathered weights to --out, and the weights beside it (rank 0).

`--nan_step K` makes rank 1's loss NaN at step K (from 0): `--nan_mode backward` sends it through the backward, for
DeepSpeed's own step to skip; `skip` skips the backward on every rank, by the trainer's check (`nonfinite_on_any_rank`),
as the trainer still does where DeepSpeed's step would apply the NaN.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/zero3_leaf_worker.py --leaf 1 --out F
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from worker_exit import leave_without_teardown  # this script's folder, tests/

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def batches(processor, rank: int, count: int):
    """Rank 0: a caption with an image each step; other ranks: text only (the vision tower still runs, blank)."""
    generator = torch.Generator().manual_seed(rank)
    words = ["red", "blue", "green", "box", "and", "a"]
    for _ in range(count):
        text = " ".join(words[i] for i in torch.randint(0, len(words), (10,), generator=generator).tolist())
        if rank == 0:
            pixels = torch.randint(0, 256, (32, 48, 3), generator=generator, dtype=torch.uint8).numpy()
            inputs = processor(text=f"{processor.image_token}{text}", images=[Image.fromarray(np.ascontiguousarray(pixels))],
                               return_tensors="pt")
        else:
            inputs = processor(text=text, return_tensors="pt")
        yield {**inputs, "labels": inputs["input_ids"].clone()}


def adam_steps(wrapper) -> list[int] | None:
    """The step counts in the torch optimizer's state, behind ZeRO's own optimizer (one per sub-group, all equal) or
    accelerate's; empty for SGD, which counts none; None where the torch optimizer is out of reach."""
    torch_optimizer = getattr(wrapper, "optimizer", None)
    if torch_optimizer is None:
        return None
    return sorted({int(state["step"]) for state in torch_optimizer.state.values() if "step" in state})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaf", type=int, required=True)
    parser.add_argument("--stage", type=int, choices=[2, 3], default=3, help="ZeRO-2 only with --leaf 0")
    parser.add_argument("--backend", choices=["deepspeed", "ddp"], default="deepspeed",
                        help="ddp: the reference, DDP over gloo with the same clipping (--leaf 0)")
    parser.add_argument("--chunked_loss", type=int, default=0, help="the chunked loss through lm_head, as on GPUs")
    parser.add_argument("--compile", type=int, default=0, help="compile the layers as train.py does under ZeRO-3")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--nan_step", type=int, default=-1, help="rank 1's loss is NaN at this step (from 0)")
    parser.add_argument("--nan_mode", choices=["backward", "skip"], default="backward")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import train
    from accelerate import Accelerator, DeepSpeedPlugin
    from train_lib.arguments import ModelArguments
    from train_lib.loop import deepspeed_skips_nonfinite_steps, nonfinite_on_any_rank
    from train_lib.model_factory import build_scratch_model, scratch_tokenizer_corpus

    fetches = [0]
    fetch = coordinator.PartitionedParameterCoordinator.fetch_sub_module

    def counted_fetch(self, *a, **k):
        fetches[0] += 1
        return fetch(self, *a, **k)

    coordinator.PartitionedParameterCoordinator.fetch_sub_module = counted_fetch

    world = int(os.environ["WORLD_SIZE"])
    if args.backend == "ddp":
        plugin, accelerator = None, Accelerator(cpu=True)
    else:
        plugin = DeepSpeedPlugin(zero_stage=args.stage, gradient_accumulation_steps=1, gradient_clipping=1.0)
        accelerator = Accelerator(deepspeed_plugin=plugin)  # cpu=True would drop the DeepSpeed plugin
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=world)
    torch.manual_seed(0)
    model_args = ModelArguments(text_hidden_size=32, text_intermediate_size=64, text_heads=2, text_kv_heads=1,
                                text_layers=2, vision_hidden_size=16, vision_intermediate_size=32, vision_heads=2,
                                vision_layers=2, max_patches=16)
    model, processor = build_scratch_model(model_args, scratch_tokenizer_corpus())
    if args.chunked_loss:
        model.config.loss_chunk_size = 16  # several chunks of the rows' targets
    if plugin is None:
        leaves = 0
    elif args.leaf:  # as train.py prepares it: some weights whole on every rank (the encoder's), the rest sharded
        leaves = train.prepare_for_zero3(model, plugin.deepspeed_config)
    else:  # the reference: every weight sharded (DeepSpeed's default threshold would keep all of these tiny ones whole)
        leaves = 0
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    graphs = []
    if args.compile:
        from modeling_llama3_siglip2.efficient_ops import compile_layers

        def recording_backend(graph_module, example_inputs):  # tracing, not codegen: what dynamo cuts the layers into
            # A linear layer is torch's F.linear, or DeepSpeed's (`memory_efficient_linear`), an autograd Function.
            targets = [str(node.target) for node in graph_module.graph.nodes]
            graphs.append({"torch": targets.count("<built-in function linear>"),
                           "deepspeed": targets.count("autograd_function_apply")})
            return graph_module.forward

        compile_layers(model, trace_hooks=False, backend=recording_backend)
    # SGD: Adam would turn float noise in gradients that are zero in exact arithmetic (e.g. a key bias) into full steps.
    # Adam where a run is compared with one of its own setup, not the reference: its step count shows a skipped step.
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)

    rank = torch.distributed.get_rank()
    losses, fetches_per_step = [], []
    for step, batch in enumerate(batches(processor, rank, args.steps)):
        before = fetches[0]
        loss = model(**batch).loss
        if step == args.nan_step and rank == 1:
            loss = loss * float("nan")
        # `skip`: the trainer's check before the backward; the step goes no further on any rank, DeepSpeed's step
        # (inside `backward`) included.
        if args.nan_step < 0 or args.nan_mode == "backward" or not nonfinite_on_any_rank(accelerator, loss):
            accelerator.backward(loss)
            if plugin is None:  # DeepSpeed clips inside its step, at its config's gradient_clipping
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        value = loss.item()
        losses.append(value if math.isfinite(value) else None)  # JSON has no NaN
        fetches_per_step.append(fetches[0] - before)

    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())) if plugin else contextlib.nullcontext():
        weights = torch.cat([parameter.detach().float().reshape(-1) for parameter in model.parameters()])
    recompiles = [str(reason) for reasons in torch._dynamo.utils.guard_failures.values() for reason in reasons]
    result = {"rank": rank, "leaves": leaves, "linears_per_graph": graphs, "recompiles": recompiles, "losses": losses,
              "fetches": fetches_per_step, "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
              "skipped_steps": getattr(model, "skipped_steps", 0),
              "adam_steps": adam_steps(model.optimizer if plugin else optimizer),
              "deepspeed_skips_nonfinite_steps": bool(plugin) and deepspeed_skips_nonfinite_steps(model)}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
        save_file({"weights": weights}, args.out + ".safetensors")
    torch.distributed.barrier()  # rank 0's files are written before any rank leaves


if __name__ == "__main__":
    main()
    leave_without_teardown()  # everything the test reads is written by now
