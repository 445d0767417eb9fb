"""The parity and generation checks on a CUDA device in bf16 with sdpa (skipped without a GPU).

bf16 keeps 8 bits of mantissa, so "equal" here means within a few bf16 steps of the reference computed by
transformers' own models on the same device and dtype, and greedy decoding may only part ways at a near-tie.
With 2 GPUs, `from_pretrained(tp_plan="auto")` is checked against one GPU under torchrun (fp32).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, Siglip2VisionModel

from .test_modeling import naflex_batch, reference_merge, sequence_with_images, text_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16 = dict(atol=3e-2, rtol=3e-2)


@pytest.fixture(scope="module", params=[1, 2], ids=["merge1", "merge2"])
def gpu_model(request, tiny_llama_dir, tiny_siglip2_dir):
    from modeling_llama3_siglip2 import from_pretrained_components

    model, processor = from_pretrained_components(str(tiny_llama_dir), str(tiny_siglip2_dir), spatial_merge_size=request.param,
                                                  max_patches=64, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.cuda().eval(), processor


def cuda(batch):
    return tuple(t.cuda() for t in batch)


def test_text_logits_match_llama_in_bf16(gpu_model, tiny_llama_dir):
    model, _ = gpu_model
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    reference = reference.cuda().eval()
    ids = torch.tensor([text_ids(33, 0), text_ids(33, 1)]).cuda()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]].float(), theirs.float(), **BF16)


def test_vision_tower_matches_siglip2_in_bf16(gpu_model, tiny_siglip2_dir):
    model, _ = gpu_model
    reference = Siglip2VisionModel.from_pretrained(tiny_siglip2_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    reference = reference.cuda().eval()
    pv, mask, shapes = cuda(naflex_batch([(8, 8), (4, 6), (2, 10)], 64, 4))
    with torch.no_grad():
        ours = model.model.vision_tower(pv.bfloat16(), mask, shapes).last_hidden_state
        theirs = reference(pixel_values=pv.bfloat16(), pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
    for i, (h, w) in enumerate(shapes.tolist()):
        torch.testing.assert_close(ours[i, : h * w].float(), theirs[i, : h * w].float(), **BF16)


def test_forward_with_images_matches_hand_reference_in_bf16(gpu_model):
    model, _ = gpu_model
    config, k = model.config, model.config.spatial_merge_size
    shapes = [(4, 6), (2, 8)]
    pv, mask, spatial = cuda(naflex_batch(shapes, 64, 4, seed=5))
    counts = [(h // k) * (w // k) for h, w in shapes]
    ids = torch.tensor([sequence_with_images(config, [text_ids(3, 1), text_ids(4, 2), text_ids(2, 3)], counts)]).cuda()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=spatial).logits
        vision = model.model.vision_tower(pv.bfloat16(), mask, spatial).last_hidden_state
        merged = torch.cat([reference_merge(vision[i], h, w, k) for i, (h, w) in enumerate(shapes)])
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == config.image_token_id] = model.model.multi_modal_projector(merged)
        expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(logits.float(), expected.float(), **BF16)


def test_packed_equals_unpacked_in_bf16(gpu_model):
    model, _ = gpu_model
    k = model.config.spatial_merge_size
    first = sequence_with_images(model.config, [text_ids(4, 7), text_ids(3, 8)], [24 // k // k])
    second = sequence_with_images(model.config, [text_ids(2, 9), text_ids(5, 10)], [16 // k // k])
    pv, mask, shapes = cuda(naflex_batch([(4, 6), (4, 4)], 64, 4, seed=11))
    position_ids = torch.tensor([list(range(len(first))) + list(range(len(second)))]).cuda()
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([first + second]).cuda(), position_ids=position_ids, pixel_values=pv,
                       pixel_attention_mask=mask, spatial_shapes=shapes).logits[0]
        alone = [model(input_ids=torch.tensor([ids]).cuda(), pixel_values=pv[i : i + 1],
                       pixel_attention_mask=mask[i : i + 1], spatial_shapes=shapes[i : i + 1]).logits[0]
                 for i, ids in enumerate([first, second])]
    torch.testing.assert_close(packed.float(), torch.cat(alone).float(), **BF16)


def test_cached_greedy_generation_matches_full_forwards_in_bf16(gpu_model):
    model, _ = gpu_model
    k = model.config.spatial_merge_size
    prompt = sequence_with_images(model.config, [text_ids(3, 12), text_ids(4, 13)], [24 // k // k])
    pv, mask, shapes = cuda(naflex_batch([(4, 6)], 64, 4, seed=14))
    images = dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
    steps = 12
    with torch.no_grad():
        cached = model.generate(input_ids=torch.tensor([prompt]).cuda(), max_new_tokens=steps, min_new_tokens=steps,
                                do_sample=False, **images)[0, len(prompt) :].tolist()
        ids = torch.tensor([prompt]).cuda()
        for step in range(steps):
            logits = model(input_ids=ids, use_cache=False, **images).logits[0, -1].float()
            top2 = logits.topk(2).values
            next_id = int(logits.argmax())
            if cached[step] != next_id:
                # Only a near-tie may flip between the cached and uncached kernels in bf16.
                assert float(top2[0] - top2[1]) < 0.1, f"step {step}: {cached[step]} vs {next_id}, gap {top2}"
                break
            ids = torch.cat([ids, torch.tensor([[next_id]]).cuda()], dim=1)


# Run by torchrun, one process per GPU: load the saved folders with `tp_plan="auto"` and compare with the same
# checkpoint on this rank's GPU without tensor parallelism.
TENSOR_PARALLEL = """
import os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import modeling_llama3_siglip2  # registers the Auto classes

inputs_file, *folders = sys.argv[1:]
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
inputs = {k: v.to(device) for k, v in load_file(inputs_file).items()}
for folder in folders:
    sharded = AutoModelForImageTextToText.from_pretrained(folder, tp_plan="auto").eval()
    whole = AutoModelForImageTextToText.from_pretrained(folder).to(device).eval()
    assert sharded.tp_size == 2, sharded.tp_size
    head = sharded.lm_head.weight
    local_rows = (head.to_local() if hasattr(head, "to_local") else head).shape[0]
    assert local_rows < whole.lm_head.weight.shape[0], "lm_head was not sharded"
    tied = whole.config.tie_word_embeddings
    assert (sharded.lm_head.weight is sharded.get_input_embeddings().weight) == tied
    with torch.no_grad():
        logits = sharded(**inputs).logits
        torch.testing.assert_close(logits, whole(**inputs).logits, atol=1e-4, rtol=1e-4)
        settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert sharded.generate(**inputs, **settings).tolist() == whole.generate(**inputs, **settings).tolist()
    print(f"rank {os.environ['RANK']}: {os.path.basename(folder)} tied={tied} lm_head rows here {local_rows}: OK",
          flush=True)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tensor_parallel_from_pretrained_gives_the_single_gpu_outputs(tmp_path):
    """`from_pretrained(folder, tp_plan="auto")` on 2 GPUs, tied and untied head, with an image: same logits and tokens."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    from modeling_llama3_siglip2 import Llama3Siglip2Config, Llama3Siglip2ForConditionalGeneration

    folders = []
    # An even vocabulary: transformers before 5.24 needs the head's rows to divide among the ranks (5.24 shards
    # 301 rows as 151 + 150).
    for tie in (True, False):
        config = Llama3Siglip2Config(
            text_config=dict(vocab_size=302, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               patch_size=4, num_patches=64),
            tie_word_embeddings=tie,
        )
        torch.manual_seed(0)
        folder = tmp_path / f"tied-{tie}"
        Llama3Siglip2ForConditionalGeneration(config).save_pretrained(folder)
        folders.append(str(folder))
    pv, mask, shapes = naflex_batch([(4, 6)], 64, 4, seed=3)
    ids = sequence_with_images(config, [text_ids(3, 1), text_ids(4, 2)], [24])
    save_file(dict(input_ids=torch.tensor([ids]), pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes),
              tmp_path / "inputs.safetensors")
    (tmp_path / "tp.py").write_text(TENSOR_PARALLEL)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(tmp_path / "tp.py"),
         str(tmp_path / "inputs.safetensors"), *folders],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count(": OK") == 4, result.stdout


def test_packed_vision_with_flex_matches_padded_images_in_bf16(gpu_model):
    """On a GPU packed images attend through flex attention's BlockMask; loss and gradients are the padded path's."""
    import copy

    from modeling_llama3_siglip2.efficient_ops import use_packed_vision

    from .test_packed_vision import images_and_text, loss_and_gradients

    model = copy.deepcopy(gpu_model[0]).train()
    k = model.config.spatial_merge_size
    batch = {key: t.cuda() for key, t in images_and_text(model, [(8, 8), (2 * k, 6 * k), (k, k), (6, 4)], 3).items()}
    padded_loss, padded_grads = loss_and_gradients(model, batch)
    use_packed_vision(model)
    packed_loss, packed_grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(packed_loss.float(), padded_loss.float(), **BF16)
    for name, want in padded_grads.items():
        error = (packed_grads[name].float() - want.float()).norm()
        assert error <= 5e-2 * want.float().norm() + 1e-3, f"{name}: {error:.2e} against {want.float().norm():.2e}"


def test_flex_decoder_with_our_packed_mask_matches_transformers_mask_in_bf16(gpu_model):
    """The model's own BlockMask for packed rows (`packed_causal_block_mask`) against the one transformers builds."""
    import copy

    from modeling_llama3_siglip2.efficient_ops import use_decoder_attention

    model = copy.deepcopy(gpu_model[0])
    use_decoder_attention(model, "flex_attention")
    lengths = [100, 3, 60, 93, 1, 127, 128]
    position_ids = torch.tensor([[p for n in lengths for p in range(n)][:256], list(range(256))]).cuda()
    input_ids = torch.randint(10, 200, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ours = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        embeds = model.get_input_embeddings()(input_ids)
        theirs = model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
    torch.testing.assert_close(ours.float(), theirs.last_hidden_state.float(), **BF16)


@pytest.mark.parametrize("packed_images", [False, True], ids=["padded_images", "packed_images"])
def test_training_forward_and_backward_with_a_host_layout_make_no_host_sync(gpu_model, packed_images):
    """The trainer's fast path (images padded with the vision mask built unread, or packed; flex decoder over packed
    rows; chunked loss) with the batch's host layout: CUDA's sync debug mode counts every host sync in a forward and
    backward after a warm-up one."""
    import copy
    import warnings

    from modeling_llama3_siglip2.efficient_ops import use_decoder_attention, use_packed_vision, use_vision_attention
    from modeling_llama3_siglip2.host_layout import HostBatchLayout

    from .test_packed_vision import images_and_text

    model = copy.deepcopy(gpu_model[0]).train()
    model.config.loss_chunk_size = 64
    (use_packed_vision if packed_images else use_vision_attention)(model)
    use_decoder_attention(model, "flex_attention")
    k = model.config.spatial_merge_size
    batch = images_and_text(model, [(8, 8), (2 * k, 6 * k), (k, k), (6, 4)], 3)
    width = 256  # packed rows: position ids restart at each sample; a multiple of flex's 128-blocks
    pad = width - batch["input_ids"].shape[1]
    batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad))
    batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
    batch["position_ids"] = torch.arange(width).expand(2, width).clone()

    def step():
        layout = HostBatchLayout.of(batch, model.config)
        on_gpu = {key: t.cuda(non_blocking=True) for key, t in batch.items()}
        with model.host_layout(layout):
            model(**on_gpu).loss.backward()

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            syncs_before_control = len(caught)
            torch.ones(1, device="cuda").item()  # a known sync: the filter below must see it
        finally:
            torch.cuda.set_sync_debug_mode("default")
    control, caught = caught[syncs_before_control:], caught[:syncs_before_control]
    assert any("called a synchronizing" in str(w.message) for w in control), [str(w.message) for w in control]
    # Each sync warns "called a synchronizing CUDA operation"; the mode's own "prototype feature" notice is not one.
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert not syncs, syncs
