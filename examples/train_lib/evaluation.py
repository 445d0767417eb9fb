"""What a run measures on held-out data, and where it reports it.

Two measures:
    eval loss       mean cross-entropy over the target tokens of a held-out split (`--eval_split`,
                    `--eval_data_files`), every `--eval_every` steps and at the end, with a few greedy generations
                    (prompt, output, reference, the image as the model saw it) sent to the trackers;
    exact match     on the embedded scenes set: the prompt is the image placeholder alone and the answer must equal
                    the caption exactly; again with every image replaced by a flat grey one of the same size, where
                    a model that reads the image drops to chance.

Distributed runs: every rank calls the same methods. Each rank reads its own shard of the held-out split; ranks step
together (a rank whose shard is done runs a forward that counts for nothing), so sharded models (FSDP, ZeRO-3) never
wait for a rank that has stopped. The totals are summed over ranks; only the main process writes to the trackers.

Shape letters: R rows in a packed batch, S tokens per row, L patches per image, D values per patch (3·p·p).
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise

import numpy as np
import torch
from accelerate.utils import DistributedType, broadcast_object_list
from PIL import Image

from modeling_llama3_siglip2.host_layout import count_targets
from processing.data import build_train_dataloader
from processing.scenes import scenes_eval_examples

from .arguments import eval_data_config

IGNORE_INDEX = -100


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


@torch.no_grad()
def caption_exact_match(model, processor, examples, batch_size: int = 32, max_new_tokens: int = 16,
                        blank_images: bool = False, synced_gpus: bool = False) -> tuple[float, list[str]]:
    """Fraction of `examples` ((images, caption) pairs) whose greedy generation equals the caption exactly.

    `synced_gpus`: keep stepping until every rank is done (a sharded model needs every rank in each forward).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    predictions = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            images = [[blank_like(im) if blank_images else im for im in imgs] for imgs, _ in chunk]
            prompts = [processor.image_token * len(imgs) for imgs, _ in chunk]
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       **({"synced_gpus": True} if synced_gpus else {}))
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            predictions += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    hits = sum(prediction == caption for prediction, (_, caption) in zip(predictions, examples))
    return hits / max(len(examples), 1), predictions


def final_reload_difference(accelerator, model, final_dir: str, batch) -> float | None:
    """Max |logits| difference between the in-memory model and `final/` reloaded by the Auto classes, on `batch`.

    Every process runs the in-memory forward (sharded models need all of them); the main process reloads
    `final/` on its device and runs it the same way (autocast in the run's mixed precision). None elsewhere.
    """
    from transformers import AutoModelForImageTextToText

    batch = batch.to(accelerator.device)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        in_memory = model(**batch).logits.float()
    model.train()
    if not accelerator.is_main_process:
        return None
    with plain_loading(accelerator):
        reloaded = AutoModelForImageTextToText.from_pretrained(final_dir).to(accelerator.device).eval()
    with torch.no_grad(), accelerator.autocast():
        from_disk = reloaded(**batch).logits.float()
    return float((in_memory - from_disk).abs().max())


@contextmanager
def plain_loading(accelerator):
    """Load a whole, unsharded model even inside a ZeRO-3 run, where transformers would partition it on load."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


class Evaluator:
    """The run's evaluations; train.py calls `initial_evaluation`, `maybe_evaluate` each step and `final_evaluation`.

    Each returns the figures for report.json (and the progress bar) and has already sent them to the trackers.
    """

    def __init__(self, model_args, data_args, train_args, processor, accelerator):
        self.processor = processor
        self.every = train_args.eval_every
        self.generate_count = train_args.eval_generate_samples
        self.max_new_tokens = train_args.eval_max_new_tokens
        self.eval_before = train_args.eval_before
        self.seq_len = data_args.seq_len
        self.scenes = (scenes_eval_examples(data_args.eval_samples, seed=train_args.seed)
                       if data_args.dataset == "scenes" and data_args.eval_samples else [])
        config = eval_data_config(data_args, train_args.seed)
        if self.every and config is None:
            raise ValueError("--eval_every needs a held-out set: --eval_split (e.g. validation) or --eval_data_files")
        # Opened now, so that a wrong split or file fails before training, not after the first N steps.
        self.loader = None if config is None else build_train_dataloader(
            config, processor, data_args.seq_len, rank=accelerator.process_index, world_size=accelerator.num_processes)
        world = accelerator.num_processes
        self.samples_per_rank = -(-data_args.eval_samples // world) if data_args.eval_samples else None
        self.eval_split = None if config is None else (data_args.eval_data_files or data_args.dataset, config.split)

    def initial_evaluation(self, step: int, model, accelerator) -> dict:
        """Scenes exact match before training (a fresh run only): the floor the trained model is compared with."""
        if not (self.scenes and self.eval_before and step == 0):
            return {}
        score, _ = caption_exact_match(accelerator.unwrap_model(model), self.processor, self.scenes,
                                       max_new_tokens=self.max_new_tokens, synced_gpus=is_sharded(accelerator))
        return {"eval_exact_match_before": score}

    def maybe_evaluate(self, step: int, model, accelerator) -> dict | None:
        """Every `eval_every` steps: the eval loss and a few generations, logged at `step`; None on other steps."""
        if not self.every or step % self.every:
            return None
        return self._held_out(step, model, accelerator)

    def final_evaluation(self, step: int, model, accelerator) -> dict:
        """After training: the eval loss and generations (with a held-out set), and the scenes exact match."""
        report = {"eval_exact_match": None, "eval_exact_match_blank_images": None}
        if self.loader is not None:
            report.update(self._held_out(step, model, accelerator))
        if self.scenes:
            unwrapped, synced = accelerator.unwrap_model(model), is_sharded(accelerator)
            report["eval_exact_match"], predictions = caption_exact_match(
                unwrapped, self.processor, self.scenes, max_new_tokens=self.max_new_tokens, synced_gpus=synced)
            report["eval_exact_match_blank_images"], _ = caption_exact_match(
                unwrapped, self.processor, self.scenes, max_new_tokens=self.max_new_tokens, blank_images=True,
                synced_gpus=synced)
            report["eval_examples"] = [{"caption": c, "prediction": p}
                                       for (_, c), p in zip(self.scenes[:5], predictions)]
            accelerator.log({name: report[name] for name in ("eval_exact_match", "eval_exact_match_blank_images")},
                            step=step)
        return report

    def _held_out(self, step: int, model, accelerator) -> dict:
        loss, targets, samples, prompts = self.eval_loss(model, accelerator)
        generations = self.generate(model, accelerator, prompts)
        figures = {"eval_loss": loss}
        accelerator.log(figures, step=step)
        if accelerator.is_main_process:
            log_generations(accelerator, generations, step)
        return {**figures, "eval_target_tokens": targets, "eval_samples": samples,
                "eval_generations": [{k: v for k, v in g.items() if k != "image"} for g in generations]}

    @torch.no_grad()
    def eval_loss(self, model, accelerator) -> tuple[float, int, int, list[dict]]:
        """Mean loss over the held-out targets of every rank, the target and sample counts, and the main process's
        first `eval_generate_samples` prompts (from the same batches)."""
        device, config = accelerator.device, accelerator.unwrap_model(model).config
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, targets, samples
        batches, spare, taken, prompts = iter(self.loader), None, 0, []
        was_training = model.training
        model.eval()
        try:
            while True:
                done_here = self.samples_per_rank is not None and taken >= self.samples_per_rank
                batch = None if done_here else next(batches, None)
                if not int(accelerator.reduce(torch.tensor(int(batch is not None), device=device), "max")):
                    break
                counts = batch is not None
                if counts:
                    if self.samples_per_rank is not None:
                        unscore_samples_after(batch, self.samples_per_rank - taken, self.processor.pad_token_id)
                    if spare is None:
                        spare = batch
                    if accelerator.is_main_process and len(prompts) < self.generate_count:
                        prompts += prompts_from_batch(batch, self.processor)[: self.generate_count - len(prompts)]
                else:  # this rank's shard is done; keep step with the others
                    batch = spare if spare is not None else self._placeholder_batch()
                batch = batch.to(device)
                targets = count_targets(batch["labels"], config)  # what the loss scores: not the image ids
                with accelerator.autocast():
                    loss = model(**batch, num_items_in_batch=targets.clamp(min=1)).loss
                if counts:
                    samples = sample_count(batch, self.processor.pad_token_id)
                    if self.samples_per_rank is not None:
                        samples = min(samples, self.samples_per_rank - taken)
                    taken += samples
                    totals += torch.stack([loss.double() * targets, targets.double(), torch.tensor(
                        float(samples), dtype=torch.float64, device=device)])
        finally:
            model.train(was_training)
        loss_sum, targets, samples = accelerator.reduce(totals, "sum").tolist()
        return loss_sum / max(targets, 1), int(targets), int(samples), prompts

    def _placeholder_batch(self):
        """One token, nothing to score: the forward a rank with an empty shard runs to keep step with the others."""
        from transformers import BatchFeature

        token = self.processor.tokenizer.bos_token_id or self.processor.pad_token_id
        return BatchFeature({"input_ids": torch.tensor([[token]]), "labels": torch.tensor([[IGNORE_INDEX]]),
                             "position_ids": torch.tensor([[0]])})

    @torch.no_grad()
    def generate(self, model, accelerator, prompts: list[dict]) -> list[dict]:
        """Greedy generations for the main process's prompts; on a sharded model every rank runs them in step."""
        sharded = is_sharded(accelerator)
        if sharded:
            prompts = broadcast_object_list([prompts])[0]
        elif not accelerator.is_main_process:
            return []
        unwrapped = accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        tokenizer, results = self.processor.tokenizer, []
        try:
            for prompt in prompts:
                inputs = {k: v.to(accelerator.device) for k, v in prompt["inputs"].items()}
                with accelerator.autocast():
                    generated = unwrapped.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                                   **({"synced_gpus": True} if sharded else {}))
                new_tokens = generated[0, inputs["input_ids"].shape[1]:]
                results.append({"prompt": prompt["prompt"], "generated": tokenizer.decode(new_tokens,
                                                                                          skip_special_tokens=True),
                                "reference": prompt["reference"], "image": prompt["image"]})
        finally:
            unwrapped.train(was_training)
        return results


def is_sharded(accelerator) -> bool:
    """Whether a forward needs every rank: FSDP, or DeepSpeed ZeRO-3."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def sample_count(batch, pad_token_id: int) -> int:
    """Samples in a packed batch: each starts where its position is 0 (padding restarts at 0 too, on a pad)."""
    return int(((batch["position_ids"] == 0) & (batch["input_ids"] != pad_token_id)).sum())


def samples_in(batch, pad_token_id: int):
    """(row, start, end) of each sample of a packed batch, in order; the rows' padding is left out."""
    ids_RS, positions_RS = batch["input_ids"], batch["position_ids"]
    for r in range(ids_RS.shape[0]):
        starts = (positions_RS[r] == 0).nonzero().flatten().tolist() + [ids_RS.shape[1]]
        for start, end in pairwise(starts):
            if ids_RS[r, start] != pad_token_id:
                yield r, start, end


def unscore_samples_after(batch, keep: int, pad_token_id: int) -> None:
    """Set the labels of every sample after the first `keep` to ignored: they are in the batch but not evaluated."""
    for index, (r, start, end) in enumerate(samples_in(batch, pad_token_id)):
        if index >= keep:
            batch["labels"][r, start:end] = IGNORE_INDEX


def prompts_from_batch(batch, processor) -> list[dict]:
    """Each sample of a packed batch as a generation prompt, with its reference continuation and first image.

    The prompt runs to the first target token after the sample's first image: the caption after its image, the
    assistant's answer after the user's turn, the text after an interleaved document's first image.
    """
    ids_RS, labels_RS = batch["input_ids"], batch["labels"]
    boi, eoi = processor.boi_token_id, processor.eoi_token_id
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    prompts, images_before = [], 0  # images of the batch come in token order, row by row
    for r, start, end in samples_in(batch, processor.pad_token_id):
        ids, labels = ids_RS[r, start:end], labels_RS[r, start:end]
        image_count = int((ids == boi).sum())
        ends = (ids == eoi).nonzero().flatten()
        after_first_image = int(ends[0]) + 1 if len(ends) else 1
        scored = (labels != IGNORE_INDEX).nonzero().flatten()
        scored = scored[scored >= after_first_image]
        if len(scored) == 0:
            images_before += image_count
            continue
        cut = int(scored[0])
        unscored = (labels[cut:] == IGNORE_INDEX).nonzero().flatten()
        reference_end = cut + int(unscored[0]) if len(unscored) else len(ids)
        prompt_images = int((ids[:cut] == boi).sum())
        inputs = {"input_ids": ids[None, :cut], "attention_mask": torch.ones(1, cut, dtype=torch.long)}
        image = None
        if prompt_images:
            chosen = slice(images_before, images_before + prompt_images)
            inputs.update(pixel_values=batch["pixel_values"][chosen], spatial_shapes=batch["spatial_shapes"][chosen],
                          pixel_attention_mask=batch["pixel_attention_mask"][chosen])
            h, w = batch["spatial_shapes"][images_before].tolist()
            image = patches_to_image(batch["pixel_values"][images_before], h, w, image_processor.patch_size,
                                     image_processor.image_mean, image_processor.image_std)
        images_before += image_count
        shown = ids[:cut][(ids[:cut] != processor.image_token_id) & (ids[:cut] != eoi)]
        shown = torch.where(shown == boi, processor.image_token_id, shown)  # one <|image|> per image
        prompts.append({
            "inputs": inputs,
            "prompt": tokenizer.decode(shown, skip_special_tokens=False),
            "reference": tokenizer.decode(ids[cut:reference_end], skip_special_tokens=True),
            "image": image,
        })
    return prompts


def patches_to_image(pixels_LD: torch.Tensor, h: int, w: int, patch: int, mean, std) -> np.ndarray:
    """The image the model saw: a (h·p, w·p, 3) uint8 array from its first h·w normalised (ph, pw, c) patches."""
    patches = pixels_LD[: h * w].float().cpu().numpy().reshape(h, w, patch, patch, 3)
    image_HWC = patches.transpose(0, 2, 1, 3, 4).reshape(h * patch, w * patch, 3)
    image_HWC = image_HWC * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return (image_HWC.clip(0, 1) * 255).round().astype(np.uint8)


def log_generations(accelerator, generations: list[dict], step: int) -> None:
    """Each generation as text (TensorBoard, W&B) and its image where the tracker shows images (main process)."""
    texts = {f"eval/sample_{i}": (f"**prompt** {g['prompt']}  \n**generated** {g['generated']}  \n"
                                  f"**reference** {g['reference']}") for i, g in enumerate(generations)}
    images = {f"eval/sample_{i}/image": g["image"] for i, g in enumerate(generations) if g["image"] is not None}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            if images:
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            tracker.log(texts, step=step)  # writes the text and flushes
        elif tracker.name == "wandb":
            if images:
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)
            tracker.log(texts, step=step)
