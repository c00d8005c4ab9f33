"""Checkpoints in Megatron's layout, written atomically and loaded without running code.

::

    SAVE/latest_checkpointed_iteration.txt        "100" (or "release")
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt
    SAVE/iter_0000100/mp_rank_01/model_optim_rng.pt

and with pipeline parallelism one folder per tensor rank and stage, ``mp_rank_TT_PPP`` (Megatron's
names): ``iter_0000100/mp_rank_01_002/model_optim_rng.pt`` is tensor rank 1 of stage 2. A stage's
model holds the whole model's parameter names for the layers it owns, so the stages of one tensor
rank join into its whole model by a union (``merge_stage_models``), which is how generation and
evaluation load a pipelined checkpoint.

Each model-parallel rank's file holds its model slice, optimizer, loss scaler, lr scheduler,
rng states (python, numpy, torch, cuda, tracker), iteration, data-loader position and the model
config, all as plain types so ``torch.load(..., weights_only=True)`` reads it. A file is written to
a temporary name and renamed; the tracker file is replaced only after every rank has written, so
a crash never leaves a half-written checkpoint as the latest; ``remove_orphaned_temporaries`` deletes
what a killed save left behind.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import mpu
from atomic import remove_orphans, temporary_path
from errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
# The remedy of untracked_checkpoints in training, where they would be taken for none and overwritten.
START_OVER = ", or pass --overwrite-checkpoints to start over there (overwriting them)"


def get_checkpoint_name(checkpoints_path: str, iteration: int | str, mp_rank: int | None = None,
                        pipeline_rank: int | None = None, pipeline_size: int | None = None) -> str:
    """Path of one model-parallel rank's (and pipeline stage's) file for ``iteration`` (an int or
    ``"release"``); this process's ranks and pipeline size by default."""
    directory = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    rank = mpu.get_model_parallel_rank() if mp_rank is None else mp_rank
    stages = mpu.get_pipeline_model_parallel_world_size() if pipeline_size is None else pipeline_size
    stage = mpu.get_pipeline_model_parallel_rank() if pipeline_rank is None else pipeline_rank
    folder = f"mp_rank_{rank:02d}" if stages == 1 else f"mp_rank_{rank:02d}_{stage:03d}"
    return os.path.join(checkpoints_path, directory, folder, CHECKPOINT_FILENAME)


def _rank_folders(folder: str) -> tuple[int, int]:
    """(model-parallel size, pipeline size) of the ``mp_rank_*`` folders in an ``iter_*`` folder; (0, 0)
    when there are none."""
    names = sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_")) if os.path.isdir(folder) else []
    if not names:
        return 0, 0
    staged = [n for n in names if n.count("_") == 3]
    if not staged:
        return len(names), 1
    stages = {n.rsplit("_", 1)[1] for n in staged}
    return len(staged) // len(stages), len(stages)


def merge_stage_models(models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole model of one tensor rank from its pipeline stages' models, stage 0 first: the union of
    their parameters (the last stage's copy of the tied word embeddings equals the first stage's)."""
    merged: dict[str, torch.Tensor] = {}
    for model in models:
        for name, tensor in model.items():
            merged.setdefault(name, tensor)
    return merged


def get_checkpoint_tracker_filename(checkpoints_path: str) -> str:
    return os.path.join(checkpoints_path, TRACKER_FILENAME)


def _fsync_directory(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _atomic_torch_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_orphaned_temporaries(save_dir: str) -> list[str]:
    """Delete the temporary files a killed save left in ``save_dir`` (the tracker's) and its rank folders."""
    removed = remove_orphans(save_dir)
    if os.path.isdir(save_dir):
        for name in sorted(os.listdir(save_dir)):
            if name.startswith("iter_") or name == "release":
                folder = os.path.join(save_dir, name)
                for rank in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                    removed += remove_orphans(os.path.join(folder, rank))
    return removed


def get_rng_state() -> dict[str, Any]:
    """Every random stream a run draws from, as plain types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "tracker": mpu.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore streams captured by ``get_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:  # a resharded checkpoint has none: the model-parallel streams stay as seeded
        mpu.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    extra: dict[str, Any],
    optimizer_state: dict | None = None,
    rng: bool = True,
) -> str:
    """Write this model-parallel rank's file (first data-parallel rank only), then the tracker.

    ``extra`` carries the plain-typed rest: config, scheduler, data position, loss scaler.
    Returns the path of this rank's file.
    """
    path = get_checkpoint_name(save_dir, iteration)
    failure = None
    if mpu.get_data_parallel_rank() == 0:
        state: dict[str, Any] = {
            "iteration": iteration,
            "model_parallel_size": mpu.get_model_parallel_world_size(),
            "pipeline_model_parallel_size": mpu.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size": mpu.get_virtual_pipeline_model_parallel_world_size(),
            "model": model_state,
            **extra,
        }
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
        if rng:
            state["rng"] = get_rng_state()
        try:
            _atomic_torch_save(state, path)
        except (OSError, RuntimeError) as err:  # a full disk, a lost mount; torch reports some as RuntimeError
            failure = getattr(err, "strerror", None) or str(err).splitlines()[0]
    _agree_on_write(save_dir, iteration, failure)  # doubles as the barrier before the tracker moves
    if mpu.is_rank_0():
        try:
            _atomic_write_text(get_checkpoint_tracker_filename(save_dir), f"{iteration}\n")
        except OSError as err:
            failure = err.strerror or str(err)
    _agree_on_write(save_dir, iteration, failure)
    return path


def _agree_on_write(save_dir: str, iteration: int | str, failure: str | None) -> None:
    """Every rank learns whether any rank's write failed; then all raise the same CheckpointError."""
    failures = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    failed = [(rank, why) for rank, why in enumerate(failures) if why is not None]
    if failed:
        rank, why = failed[0]
        try:
            previous = read_tracker(save_dir)
        except CheckpointError:
            previous = None
        kept = f"the previous checkpoint (iteration {previous}) is intact" if previous is not None else \
            "no earlier checkpoint was touched"
        raise CheckpointError(f"{save_dir}: saving iteration {iteration} failed on rank {rank} ({why}); {kept}; "
                              "free space (or fix the mount) and rerun the command to resume", every_rank=True)


def remove_old_checkpoints(save_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` ``iter_*`` folders, never the one the tracker names.

    Called after the tracker names the new checkpoint durably. Each folder is first renamed to a hidden
    temporary, so a kill in the middle leaves an orphan for the next run to remove rather than a
    half-deleted ``iter_*`` that looks like a checkpoint.
    """
    try:
        current = read_tracker(save_dir)
    except CheckpointError:
        return []
    iterations = sorted(int(name[5:]) for name in os.listdir(save_dir)
                        if name.startswith("iter_") and name[5:].isdigit()
                        and os.path.isdir(os.path.join(save_dir, name)))
    doomed = [it for it in iterations[:-keep] if it != current] if keep > 0 else []
    removed = []
    for it in doomed:
        folder = os.path.join(save_dir, f"iter_{it:07d}")
        aside = temporary_path(folder)
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(folder)
    return removed


def write_checkpoint_files(save_dir: str, iteration: int | str,
                           states: list[dict[str, Any]] | list[list[dict[str, Any]]]) -> None:
    """Write every rank's file of one checkpoint from a single process (the conversion tools), then the
    tracker, so the directory names the checkpoint only once it is complete. ``states`` are by
    model-parallel rank, or by model-parallel rank and then pipeline stage."""
    for rank, state in enumerate(states):
        stages = state if isinstance(state, list) else [state]
        for stage, one in enumerate(stages):
            _atomic_torch_save(one, get_checkpoint_name(save_dir, iteration, rank, stage, len(stages)))
    _atomic_write_text(get_checkpoint_tracker_filename(save_dir), f"{iteration}\n")


def _load_file(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]})") from None


def read_all_ranks(load_dir: str) -> tuple[int | str, list[dict[str, Any]]]:
    """The tracked iteration of ``load_dir`` and every model-parallel rank's state, in rank order, for a
    checkpoint without pipeline parallelism (``read_rank_grid`` reads any)."""
    iteration, grid = read_rank_grid(load_dir)
    if len(grid[0]) > 1:
        raise CheckpointError(f"{load_dir}: a pipelined checkpoint ({len(grid[0])} stages); join its stages first "
                              "(conversion.restage_states)")
    return iteration, [stages[0] for stages in grid]


def read_rank_grid(load_dir: str) -> tuple[int | str, list[list[dict[str, Any]]]]:
    """The tracked iteration of ``load_dir`` and every rank's state: by model-parallel rank, then by
    pipeline stage (one stage without pipeline parallelism)."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"{load_dir}: no such directory")
    iteration = read_tracker(load_dir)
    untracked = untracked_checkpoints(load_dir, "")
    if untracked is not None:
        raise CheckpointError(untracked)
    if iteration is None:
        raise CheckpointError(f"{load_dir}: no checkpoint there (no {TRACKER_FILENAME}); point at a directory "
                              "written by --save")
    folder = os.path.dirname(os.path.dirname(get_checkpoint_name(load_dir, iteration, 0, 0, 1)))
    mp_size, pp_size = _rank_folders(folder)
    if not mp_size:
        raise CheckpointError(f"{folder}: missing; the tracker names iteration {iteration} but its files are gone")
    grid = []
    for rank in range(mp_size):
        stages = []
        for stage in range(pp_size):
            path = get_checkpoint_name(load_dir, iteration, rank, stage, pp_size)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing; {folder} holds {mp_size} x {pp_size} rank folders")
            state = _load_file(path)
            for key, what, size in (("model_parallel_size", "model-parallel size", mp_size),
                                    ("pipeline_model_parallel_size", "pipeline size", pp_size)):
                if state.get(key, size) != size:
                    folders = f"{mp_size}" if pp_size == 1 else f"{mp_size} x {pp_size}"
                    raise CheckpointError(f"{path}: says {what} {state[key]} but {folder} holds {folders} rank folders")
            stages.append(state)
        grid.append(stages)
    return iteration, grid


def checkpoint_root_of(path: str) -> str | None:
    """The checkpoint directory (the one holding the tracker file) that ``path`` lies inside, if any:
    for a mistaken ``--load`` of ``model_optim_rng.pt``, ``mp_rank_XX`` or ``iter_XXXXXXX``."""
    probe = os.path.abspath(path)
    for _ in range(4):  # model_optim_rng.pt -> mp_rank_XX -> iter_XXXXXXX -> the directory
        if os.path.isfile(get_checkpoint_tracker_filename(probe)):
            return probe
        probe = os.path.dirname(probe)
    return None


def untracked_checkpoints(folder: str, remedy: str) -> str | None:
    """Why ``folder`` must not be written or read as if empty: it holds ``iter_*``/``release`` checkpoints but
    its tracker is missing or not a file (a run would start over and overwrite them). ``None`` when fine;
    ``remedy`` ends the message (e.g. how to start over on purpose)."""
    tracker = get_checkpoint_tracker_filename(folder)
    if os.path.isfile(tracker) or not os.path.isdir(folder):
        return None
    if os.path.lexists(tracker):
        return f"{tracker} is not a file (a directory?); remove it and write the iteration to continue from into it"
    found = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))
                   and (name == "release" or name.startswith("iter_") and name[5:].isdigit()))
    if not found:
        return None
    newest = max((int(name[5:]) for name in found if name != "release"), default="release")
    shown = ", ".join(found[-3:]) if len(found) <= 3 else f"{len(found)} checkpoints, {found[0]} to {found[-1]}"
    return (f"{folder} holds checkpoints ({shown}) but no {TRACKER_FILENAME} naming the one to use; to use the "
            f"newest, write it (echo {newest} > {tracker}){remedy}")


def read_tracker(load_dir: str) -> int | str | None:
    """The iteration (or ``"release"``) named by the tracker file, ``None`` if there is none."""
    tracker = get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{tracker}: expected an iteration number or 'release', found {text!r}"
        ) from None


def _sizes_line(mp: int, pp: int, virtual: int = 1) -> str:
    line = f"model-parallel size {mp}" + (f", pipeline size {pp}" if pp > 1 else "")
    return line + (f" ({virtual} virtual stages)" if virtual > 1 else "")


def _flags_line(mp: int, pp: int) -> str:
    return f"--model-parallel-size {mp}" + (f" --pipeline-model-parallel-size {pp}" if pp > 1 else "")


def _reshard_hint(load_dir: str, mp: int, pp: int, saved_pp: int) -> str:
    stages = f" --target-pipeline-model-parallel-size {pp}" if pp > 1 or saved_pp > 1 else ""
    return (f"convert it with tools/reshard_checkpoint.py --load {load_dir} --target-model-parallel-size {mp}"
            f"{stages} --save NEW_DIR")


def load_checkpoint_state(load_dir: str, restage: bool = False,
                          untracked_remedy: str | None = "") -> dict[str, Any] | None:
    """This rank's checkpoint from ``load_dir``, or ``None`` when there is none.

    A directory written with another model-parallel or pipeline layout is a ``CheckpointError`` naming
    both, except that ``restage`` (generation and evaluation, which run the whole model on each
    model-parallel group) joins a pipelined checkpoint's stages into one model (weights only). So is one
    holding checkpoints without a tracker (``untracked_checkpoints``, ending with ``untracked_remedy``;
    ``None`` accepts them as no checkpoint).
    """
    iteration = read_tracker(load_dir)
    untracked = None if untracked_remedy is None else untracked_checkpoints(load_dir, untracked_remedy)
    if untracked is not None:
        raise CheckpointError(untracked)
    if iteration is None:
        return None
    mp_size = mpu.get_model_parallel_world_size()
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    folder = os.path.dirname(os.path.dirname(get_checkpoint_name(load_dir, iteration)))
    saved_mp, saved_pp = _rank_folders(folder)
    if not saved_mp:
        raise CheckpointError(f"{folder}: missing; the tracker names iteration {iteration} but its files are gone")
    if restage and saved_pp > 1 and pp_size == 1 and saved_mp == mp_size:
        states = [_load_file(get_checkpoint_name(load_dir, iteration, None, stage, saved_pp))
                  for stage in range(saved_pp)]
        merged = {k: v for k, v in states[0].items() if k not in ("optimizer", "rng", "model")}
        merged.update(model=merge_stage_models([s["model"] for s in states]), pipeline_model_parallel_size=1,
                      virtual_pipeline_model_parallel_size=1)
        return merged
    if (saved_mp, saved_pp) != (mp_size, pp_size):
        raise CheckpointError(
            f"{load_dir}: checkpoint was saved with {_sizes_line(saved_mp, saved_pp)}, this run uses "
            f"{_flags_line(mp_size, pp_size)}; run with {_flags_line(saved_mp, saved_pp)}, or "
            f"{_reshard_hint(load_dir, mp_size, pp_size, saved_pp)}"
        )
    path = get_checkpoint_name(load_dir, iteration)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the tracker names iteration {iteration} but its file is gone")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({str(err).splitlines()[0]}); point "
            f"{get_checkpoint_tracker_filename(load_dir)} at an earlier iteration"
        ) from None
    saved_mp = state.get("model_parallel_size", mp_size)
    if saved_mp != mp_size:
        raise CheckpointError(
            f"{path}: checkpoint was saved with {_sizes_line(saved_mp, pp_size)}, this run uses "
            f"{_sizes_line(mp_size, pp_size)}; run with the layout it was saved with, or "
            f"{_reshard_hint(load_dir, mp_size, pp_size, pp_size)}"
        )
    return state


def check_virtual_stages(load_dir: str, state: dict[str, Any]) -> None:
    """The checkpoint's chunks per pipeline stage are this run's (known once the model's depth is)."""
    saved = state.get("virtual_pipeline_model_parallel_size", 1)
    current = mpu.get_virtual_pipeline_model_parallel_world_size()
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    if state.get("pipeline_model_parallel_size", 1) > 1 and pp_size > 1 and saved != current:
        raise CheckpointError(
            f"{load_dir}: checkpoint was saved with {saved} virtual stage(s) per pipeline stage, this run uses "
            f"{current} (--num-layers-per-virtual-pipeline-stage); run with the layout it was saved with, or "
            f"{_reshard_hint(load_dir, mpu.get_model_parallel_world_size(), pp_size, pp_size)}"
        )


def check_config(path: str, saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Raise ``CheckpointError`` naming the first model-shape field that differs."""
    for key in keys:
        if key in saved and saved[key] != current[key]:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={saved[key]}, this run has {key}={current[key]}; "
                "pass the flags the checkpoint was trained with"
            )
