"""`HostBatchLayout`: the forward's data-dependent sizes read on the host before the batch moves, so that a training
forward makes no host sync of its own. The model's result must not change by a bit."""

import contextlib
import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_llama3_siglip2.efficient_ops import use_vision_attention
from modeling_llama3_siglip2.host_layout import HostBatchLayout, count_targets

from .test_modeling import text_ids
from .test_packed_vision import images_and_text, loss_and_gradients

# Ops whose result size or value depends on the data: on a GPU each one makes the host wait for the device.
DATA_DEPENDENT = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::unique",
                  "aten::_unique2"}


class DataDependentOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in DATA_DEPENDENT:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def reading_no_image_shapes(model):
    """`_image_shapes` reads the grids back from the batch's tensors (`.cpu()`: a host sync on a GPU)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the forward read the image shapes from the batch's tensors")

    model.model._image_shapes = refuse
    try:
        yield
    finally:
        del model.model._image_shapes


def training_batch(model, seed=3):
    k = model.config.spatial_merge_size
    batch = images_and_text(model, [(8, 8), (2 * k, 6 * k), (k, k), (6, 4), (4, 2 * k)], seed=seed)
    batch["labels"][0, :7] = -100  # a prompt that is not a target
    return batch


@pytest.mark.parametrize("fixture", ["built", "built_merge2"])
def test_layout_gives_the_same_loss_and_gradients_without_the_models_reads(fixture, request):
    """The model's own reads go: the placeholders' and the targets' `nonzero`, and the image shapes' `.cpu()` (a
    no-op on the CPU, so `_image_shapes` is made to refuse). transformers' mask builders on the CPU's sdpa path read
    too (`padding_mask.all()`); they are the same with and without a layout."""
    model = copy.deepcopy(request.getfixturevalue(fixture)[0]).train()
    model.config.loss_chunk_size = 16  # the training loss on a GPU: logits for the targets only, a chunk at a time
    batch = training_batch(model)
    with DataDependentOps() as without:
        want_loss, want_grads = loss_and_gradients(model, batch)
    layout = HostBatchLayout.of(batch, model.config)
    with DataDependentOps() as within, model.host_layout(layout), reading_no_image_shapes(model):
        loss, grads = loss_and_gradients(model, batch)
    assert without.seen["aten::nonzero"] == 2
    assert within.seen == without.seen - Counter({"aten::nonzero": 2})
    assert model.model.host_batch_layout is None  # for that call only
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[name], want_grads[name]) for name in grads)


def test_text_only_batch_and_a_layout_for_another_batch(built):
    model = copy.deepcopy(built[0]).train()
    model.config.loss_chunk_size = 16
    ids = torch.tensor([text_ids(12, 1), text_ids(12, 2)])
    batch = {"input_ids": ids, "labels": ids.clone()}
    want_loss, want_grads = loss_and_gradients(model, batch)
    with model.host_layout(HostBatchLayout.of(batch, model.config)):
        loss, grads = loss_and_gradients(model, batch)
    assert torch.equal(loss, want_loss) and all(torch.equal(grads[name], want_grads[name]) for name in grads)
    images = training_batch(model)
    with model.host_layout(HostBatchLayout.of(batch, model.config)), pytest.raises(ValueError, match="made for"):
        model(**images)
    assert model.model.host_batch_layout is None  # restored after an error too


def test_layout_checks_the_batch_on_the_host(built):
    model = built[0]
    batch = training_batch(model)
    with pytest.raises(ValueError, match="labels is on meta"):
        HostBatchLayout.of({**batch, "labels": batch["labels"].to("meta")}, model.config)
    shapes = batch["spatial_shapes"].clone()
    shapes[1, 0] += 1
    with pytest.raises(ValueError, match="image 1: spatial_shapes"):
        HostBatchLayout.of({**batch, "spatial_shapes": shapes}, model.config)


def test_vision_mask_built_unread_gives_sdpas_results(built):
    """`use_vision_attention`: the padded vision tower's sdpa mask without transformers' `padding_mask.all()`, the
    read it makes to skip a mask with no padding (NaFlex batches pad nearly always)."""
    model = copy.deepcopy(built[0]).train()
    batch = training_batch(model)
    with DataDependentOps() as with_read:
        want_loss, want_grads = loss_and_gradients(model, batch)
    assert use_vision_attention(model) == 1
    with DataDependentOps() as unread:
        loss, grads = loss_and_gradients(model, batch)
    assert unread.seen == with_read.seen - Counter({"aten::_local_scalar_dense": 1})
    assert torch.equal(loss, want_loss) and all(torch.equal(grads[name], want_grads[name]) for name in grads)
    use_vision_attention(model, "sdpa")
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_target_count_is_what_the_loss_scores(built):
    """`num_items_in_batch` from `count_targets` turns the loss's sum into its mean, also when the labels hold the
    image placeholders (user-made labels): the loss never scores those, so the count must not either."""
    model = copy.deepcopy(built[0]).train()
    model.config.loss_chunk_size = 16
    batch = training_batch(model)  # labels are the input ids: placeholders included
    count = count_targets(batch["labels"], model.config)
    assert int(count) == len(HostBatchLayout.of(batch, model.config).target_positions)
    assert int((batch["labels"][:, 1:] != -100).sum()) > int(count)
    with torch.no_grad():
        mean = model(**batch).loss
        summed = model(**batch, num_items_in_batch=count).loss
        plain = model.eval()(**batch, num_items_in_batch=count).loss  # the unchunked loss counts the same
    torch.testing.assert_close(summed, mean)
    torch.testing.assert_close(plain, mean)


def test_host_work_is_not_traced_by_a_whole_model_compile():
    """A whole-model compile (DeepSpeed's DeepCompile compiles the model whole) must leave the batch's host work
    eager. Traced, pinning the host tensor failed on 2 H200s ("NYI: aten._pin_memory.default" in fake tensors), and
    the merged-patch index, built from each batch's image grids, would specialise every graph on them."""
    from modeling_llama3_siglip2.host_layout import host_to_device
    from modeling_llama3_siglip2.modeling_llama3_siglip2 import merged_patch_index

    x = torch.arange(16.0)
    for name, host_work in (("merged_patch_index", lambda: merged_patch_index([(2, 4), (4, 2)], 8, 2, x.device)),
                            ("host_to_device", lambda: host_to_device(torch.arange(3), x.device))):
        explained = torch._dynamo.explain(lambda x: (x * 2, host_work()))(x)  # noqa: B023 (called at once)
        reasons = [str(reason.reason) for reason in explained.break_reasons]
        assert any(f"function {name} at" in reason for reason in reasons), f"{name} was traced: {reasons}"
