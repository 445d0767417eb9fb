"""One rank of tests/test_zero3_leaf_layers.py: a tiny VLM trained 4 steps under DeepSpeed ZeRO-3 (on the CPU through
DeepSpeed's CPU accelerator and gloo), prepared as train.py prepares it (`--leaf 1`: leaf layers, torch's `F.linear`,
the encoder's weights whole on every rank) or with DeepSpeed's defaults and every weight sharded. Rank 0's batches carry
an image, rank 1's are text only; `--compile 1` compiles the layers as train.py does under ZeRO-3 (to a backend that
records each graph's linear layers). Writes the losses, the DeepSpeed sub-module fetches, the graphs, dynamo's reasons
for recompiling, and a digest of the gathered weights to --out, and the weights beside it (rank 0).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/zero3_leaf_worker.py --leaf 1 --out F
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaf", type=int, required=True)
    parser.add_argument("--compile", type=int, default=0, help="compile the layers as train.py does under ZeRO-3")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import train
    from accelerate import Accelerator, DeepSpeedPlugin
    from train_lib.arguments import ModelArguments
    from train_lib.model_factory import build_scratch_model, scratch_tokenizer_corpus

    fetches = [0]
    fetch = coordinator.PartitionedParameterCoordinator.fetch_sub_module

    def counted_fetch(self, *a, **k):
        fetches[0] += 1
        return fetch(self, *a, **k)

    coordinator.PartitionedParameterCoordinator.fetch_sub_module = counted_fetch

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1, gradient_clipping=1.0)
    accelerator = Accelerator(deepspeed_plugin=plugin)  # cpu=True would drop the DeepSpeed plugin
    world = int(os.environ["WORLD_SIZE"])
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=world)
    torch.manual_seed(0)
    model_args = ModelArguments(text_hidden_size=32, text_intermediate_size=64, text_heads=2, text_kv_heads=1,
                                text_layers=2, vision_hidden_size=16, vision_intermediate_size=32, vision_heads=2,
                                vision_layers=2, max_patches=16)
    model, processor = build_scratch_model(model_args, scratch_tokenizer_corpus())
    if args.leaf:  # as train.py prepares it: some weights whole on every rank (the encoder's), the rest sharded
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
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)

    rank = torch.distributed.get_rank()
    losses, fetches_per_step = [], []
    for batch in batches(processor, rank, 4):
        before = fetches[0]
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        fetches_per_step.append(fetches[0] - before)

    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = torch.cat([parameter.detach().float().reshape(-1) for parameter in model.parameters()])
    recompiles = [str(reason) for reasons in torch._dynamo.utils.guard_failures.values() for reason in reasons]
    result = {"rank": rank, "leaves": leaves, "linears_per_graph": graphs, "recompiles": recompiles, "losses": losses,
              "fetches": fetches_per_step, "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
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
