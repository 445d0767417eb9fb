"""Resumable checkpoints: accelerate's `save_state`, the run's counters and the files `from_pretrained` needs, made
atomic across any number of processes and checked on resume.

A folder `checkpoints/step-N` exists only when every process's part of it is on disk and verifies:

    1. the owner of the copy creates `checkpoints/.partial-step-N/`; every process waits for it;
    2. every process writes its part (`accelerator.save_state`); the owner adds `trainer_state.json` and `hf/`;
    3. on each node, the local main process fsyncs what that node's processes wrote;
    4. the owner writes `manifest.json` (every file's size; sha256 of the small ones) last, fsyncs it and the
       folders, and renames `.partial-step-N` to `step-N`;
    5. only when every owner has renamed its copy are older checkpoints pruned.
Every step ends with an exchange between all processes (a barrier that also carries errors), so a failure on one
process (a full disk, say) raises a clear error on all of them instead of leaving the others waiting; the partial
folder is then removed and the previous checkpoint is untouched. A process killed at any moment leaves at most a
`.partial-*` folder, which resume ignores and the next save removes.

Where the copy lives (the owner):
    * one shared file system, one node or several: one copy, owned by the job's main process (the default);
    * a local disk on each node: `ProjectConfiguration(save_on_each_node=True)`; each node's local main process owns
      its node's copy (the model, optimizer and scheduler files, as accelerate writes them with that setting, plus
      its own processes' RNG states). `resolve_resume(..., accelerator)` then picks the newest step complete on
      every node.
      FSDP's sharded state and DeepSpeed write one copy spread over all ranks' files, so on several nodes they
      need the shared file system.

Checksums: sha256 ran at 0.6 GB/s on one core of the (busy, 2-core) CI machine, so hashing a 1B model's weights
and Adam state (~16 GB) would add ~25 s to every save and every resume. Files up to `HASHED_FILE_BYTES` are hashed
(the counters, the scheduler, RNG states, DCP metadata, config and tokenizer); larger ones are checked by size,
which catches truncation, not bit flips.

`checkpoints/step-N/` holds accelerate's state files, `trainer_state.json` (the counters and data position, JSON),
`hf/` (config.json, generation_config.json, processor files: what `examples/export_checkpoint.py` needs to make
a Hub folder offline) and `manifest.json`. Nothing here unpickles; accelerate loads its `.bin`/`.pkl` files with
`weights_only=True`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil

from accelerate.utils import DistributedType, gather_object

logger = logging.getLogger(__name__)

STEP_FOLDER = re.compile(r"^step-(\d+)$")
PARTIAL_PREFIX = ".partial-"
# Hidden folders a killed save or prune can leave behind: a copy being written, or one being deleted.
LEFTOVER_FOLDER = re.compile(r"^\.(partial|deleting)-step-\d+$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
HF_FILES = "hf"
MANIFEST_FORMAT = 1
HASHED_FILE_BYTES = 16 * 2**20
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How a full disk reads when it surfaces as text: torch.save's stream writer, safetensors (Rust), DCP's summary.
DISK_FULL_MARKERS = ("No space left on device", "StorageFull", "Disk quota exceeded", "unexpected pos",
                     "file write failed")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder that does not verify; the message names the folder, the file and what is wrong."""


class CheckpointDiskFullError(OSError):
    """A save that ran out of disk; an OSError with errno ENOSPC, so callers catching OSError still see it."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


class CheckpointSaveError(RuntimeError):
    """A save that failed on some process for another reason; the message names the process and the error."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_folders(output_dir: str) -> list[tuple[int, str]]:
    """Every `step-N` folder, complete or not, as (N, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    matches = (STEP_FOLDER.match(name) for name in os.listdir(root))
    return sorted((int(m.group(1)), os.path.join(root, m.group(0))) for m in matches if m)


def verify_checkpoint(checkpoint: str) -> None:
    """Raise CorruptCheckpointError unless every file in the manifest is there with its size (and sha256)."""
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise CorruptCheckpointError(f"{checkpoint} is not a complete checkpoint: {problem}")


def checkpoint_problem(checkpoint: str) -> str | None:
    """None if `checkpoint` verifies, else what is wrong, naming the file: 'optimizer.bin is missing'."""

    def bad(name, what):
        return f"{name} {what}"

    if not os.path.isdir(checkpoint):
        return "the folder does not exist"
    try:
        with open(os.path.join(checkpoint, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return bad(MANIFEST, "is missing (the save did not finish)")
    except (ValueError, KeyError, TypeError):
        return bad(MANIFEST, "is not a valid manifest (cut short?)")
    if not isinstance(files, dict) or TRAINER_STATE not in files:
        return bad(TRAINER_STATE, "is not listed in the manifest")
    for name, expected in files.items():
        path = os.path.join(checkpoint, name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return bad(name, "is missing")
        expected_size = expected.get("size") if isinstance(expected, dict) else None
        if size != expected_size:
            cut = " (truncated)" if isinstance(expected_size, int) and size < expected_size else ""
            return bad(name, f"is {size} bytes, the manifest says {expected_size}{cut}")
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return bad(name, "does not match its sha256 in the manifest (corrupted)")
    return None


def complete_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders that verify, oldest first."""
    return [path for _, path in step_folders(output_dir) if checkpoint_problem(path) is None]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str, accelerator=None) -> str | None:
    """'latest' → the newest checkpoint that verifies (None: start fresh), skipping corrupt ones with a warning that
    names the bad file; a path → that checkpoint, or CorruptCheckpointError naming what is wrong with it.

    With `accelerator`, every process must call it: the owners of the copies verify, and all processes agree on one
    step, the newest that is complete in every copy (with per-node copies, one node may have sealed a step that
    another had not when the job was killed).
    """
    if not resume_from_checkpoint:
        return None
    verifies = accelerator is None or _owns_copy(accelerator)
    if resume_from_checkpoint != "latest":
        problems = [p for p in _exchange(accelerator, checkpoint_problem(resume_from_checkpoint) if verifies else None)
                    if p]
        if problems:
            raise CorruptCheckpointError(f"{resume_from_checkpoint} is not a complete checkpoint: {problems[0]}")
        return resume_from_checkpoint

    good = None
    if verifies:
        good = []
        for step, path in reversed(step_folders(output_dir)):
            problem = checkpoint_problem(path)
            if problem:
                logger.warning("skipping checkpoint %s: %s; trying the one before it", path, problem)
                continue
            good.append(step)
            if not _per_node_copies(accelerator):
                break  # one copy: the newest good one is the answer
    views = [set(view) for view in _exchange(accelerator, good) if view is not None]
    common = set.intersection(*views) if views else set()
    if not common:
        if step_folders(output_dir):
            logger.warning("no checkpoint in %s is complete (in every node's copy); starting from scratch",
                           checkpoint_root(output_dir))
        return None
    step = max(common)
    if any(max(view) > step for view in views):
        logger.warning("newer checkpoints are complete on some nodes only; resuming from step %d", step)
    return os.path.join(checkpoint_root(output_dir), f"step-{step}")


def load_trainer_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict, keep: int, *, model_config=None,
                    generation_config=None, processor=None) -> str:
    """Write `checkpoints/step-N` atomically on behalf of every process and keep the newest `keep` (0: all).

    Every process must call it. `trainer_state` (JSON) is the run's counters; `model_config`, `generation_config`
    and `processor` (anything with `save_pretrained`) go to `hf/` so the checkpoint exports without the training
    script. Raises CheckpointDiskFullError (an OSError, ENOSPC) or CheckpointSaveError on every process if any
    process fails; the previous checkpoint is then intact and no partial folder is left.
    """
    _check_supported(accelerator)
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f"{PARTIAL_PREFIX}step-{step}")
    owner = _owns_copy(accelerator)

    def prepare():
        _remove_leftovers(root)
        os.makedirs(partial)

    def write():
        accelerator.save_state(partial, safe_serialization=True)
        if owner:
            with open(os.path.join(partial, TRAINER_STATE), "w") as f:
                json.dump(trainer_state, f, indent=1)
            for item in (model_config, generation_config, processor):
                if item is not None:
                    item.save_pretrained(os.path.join(partial, HF_FILES))
        return _files_under(partial)

    _phase(accelerator, prepare if owner else None, partial, final)
    listings = _phase(accelerator, write, partial, final)
    node = _node(accelerator)
    node_files = sorted(set().union(*(files for rank_node, files in listings if rank_node == node)))
    copy_files = node_files if _per_node_copies(accelerator) else sorted(set().union(*(f for _, f in listings)))

    def seal():
        copy = f"node of rank {node}" if _per_node_copies(accelerator) else "shared"
        _write_manifest(partial, step, accelerator.num_processes, copy, sorted({*copy_files, *_files_under(partial)}))
        if os.path.exists(final):  # resumed from an earlier step: this step-N is from the abandoned timeline
            _delete(final, root)
        os.rename(partial, final)
        _fsync(root, directory=True)

    _phase(accelerator, (lambda: _fsync_all(partial, node_files)) if accelerator.is_local_main_process else None,
           partial, final)
    _phase(accelerator, seal if owner else None, partial, final)
    if owner:
        _prune(output_dir, step, keep)
    return final


def _phase(accelerator, work, partial: str, final: str) -> list:
    """Run `work` (None: nothing to do here), then exchange results with every process: a barrier that also
    carries failures. Returns every process's (node, result); raises on every process if any failed."""
    result, failure = None, None
    if work is not None:
        try:
            result = work()
        except Exception as error:  # noqa: BLE001 - any failure: reported to every process, raised on all
            failure = _describe_failure(error, accelerator.process_index, os.path.dirname(partial))
            local_error = error
    reports = _exchange(accelerator, (_node(accelerator), result, failure))
    failures = [f for _, _, f in reports if f]
    if not failures:
        return [(node, r) for node, r, _ in reports]
    if _owns_copy(accelerator):
        shutil.rmtree(partial, ignore_errors=True)
    _exchange(accelerator, None)  # so that no process raises before the partial folder is gone
    last = next((p for _, p in reversed(step_folders(os.path.dirname(os.path.dirname(partial))))
                 if p != final and checkpoint_problem(p) is None), None)
    intact = f"the last complete checkpoint ({last}) is intact" if last else "there is no earlier complete checkpoint"
    details = "; ".join(f["message"] for f in failures)
    full = [f for f in failures if f["disk_full"]]
    if full:
        message = (f"disk full while saving checkpoint {final}: {_human(full[0]['free'])} free on that file system "
                   f"when it failed. The partial folder was removed and {intact}. Free space, lower "
                   f"--keep_checkpoints or choose a larger --output_dir. ({details})")
        error_type = CheckpointDiskFullError
    else:
        message = f"saving checkpoint {final} failed: {details}. The partial folder was removed and {intact}."
        error_type = CheckpointSaveError
    if failure is not None:
        raise error_type(message) from local_error
    raise error_type(message)


def _describe_failure(error: BaseException, rank: int, root: str) -> dict:
    free = shutil.disk_usage(root).free if os.path.isdir(root) else None
    return {"message": f"rank {rank}: {type(error).__name__}: {error}", "disk_full": _is_disk_full(error),
            "free": free}


def _is_disk_full(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 10:  # the cause chain: DCP and accelerate wrap the OSError
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(error) for marker in DISK_FULL_MARKERS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _human(size: float | None) -> str:
    if size is None:
        return "unknown space"
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def _exchange(accelerator, item) -> list:
    """Every process's `item`, on every process (just [item] without an accelerator or with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [item]
    return gather_object([item])


def _per_node_copies(accelerator) -> bool:
    return accelerator is not None and accelerator.project_configuration.save_on_each_node


def _owns_copy(accelerator) -> bool:
    """The process that creates, seals, prunes and verifies a copy: the job's main one, or each node's."""
    return accelerator.is_local_main_process if _per_node_copies(accelerator) else accelerator.is_main_process


def _node(accelerator) -> int:
    """A node's id: the global rank of its local main process (torchrun numbers a node's processes in a row)."""
    return accelerator.process_index - accelerator.local_process_index


def _check_supported(accelerator) -> None:
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("ProjectConfiguration(automatic_checkpoint_naming=True) makes save_state ignore the folder "
                         "it is given; save_checkpoint names the folders itself: leave it off")
    several_nodes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) < accelerator.num_processes
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if _per_node_copies(accelerator) and several_nodes and sharded:
        raise ValueError(f"save_on_each_node with {accelerator.distributed_type.value} on several nodes: its state "
                         "is one copy spread over every rank's files (and metadata from rank 0 only), so each node's "
                         "disk would hold an unloadable part. Save to a file system all nodes share instead.")


def _files_under(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(parent, name), folder)
                  for parent, _, names in os.walk(folder) for name in names)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if not (directory and error.errno in (errno.EINVAL, errno.ENOTSUP)):  # some file systems can't sync folders
            raise
    finally:
        os.close(fd)


def _fsync_all(folder: str, files: list[str]) -> None:
    """fsync what this node's processes wrote: dirty pages live in the writing node's cache, whoever wrote them."""
    for name in files:
        if os.path.exists(os.path.join(folder, name)):
            _fsync(os.path.join(folder, name))


def _write_manifest(folder: str, step: int, num_processes: int, copy: str, files: list[str]) -> None:
    """The processes' listings, united, name files a stale directory cache could hide from this one (NFS); a name
    that is gone now was a writer's temporary file (DCP's `.metadata.tmp`), renamed before the writer returned."""
    entries = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        entries[name] = {"size": size, **({"sha256": _sha256(path)} if size <= HASHED_FILE_BYTES else {})}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "num_processes": num_processes, "copy": copy,
                "files": entries}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for parent, _, _ in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):  # deepest first
        _fsync(parent, directory=True)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _delete(folder: str, root: str) -> None:
    """Hide the folder under a leftover name first, so a kill mid-delete never leaves a half-deleted `step-N`."""
    hidden = os.path.join(root, f".deleting-{os.path.basename(folder)}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(root: str) -> None:
    if os.path.isdir(root):
        for name in os.listdir(root):
            if LEFTOVER_FOLDER.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _prune(output_dir: str, step: int, keep: int) -> None:
    """Keep the new checkpoint and the newest `keep - 1` older ones that verify; delete older and broken ones.
    Runs only once every copy of step N is sealed, so a resume always has a complete checkpoint to go to."""
    folders = step_folders(output_dir)
    newer = [path for s, path in folders if s > step]
    if newer:
        logger.warning("%s are newer than step-%d, which was just saved (an earlier run's?); "
                       "--resume_from_checkpoint latest would pick them", ", ".join(newer), step)
    if keep <= 0:
        return
    kept = 0
    for _, path in reversed([(s, p) for s, p in folders if s < step]):
        if kept < keep - 1 and checkpoint_problem(path) is None:
            kept += 1
            continue
        try:
            _delete(path, checkpoint_root(output_dir))
        except OSError as error:  # a failed prune costs disk space, not correctness
            logger.warning("could not delete old checkpoint %s: %s", path, error)
