"""Checkpoints in Megatron's layout, written atomically and loaded without running code.

::

    SAVE/latest_checkpointed_iteration.txt        "100" (or "release")
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt
    SAVE/iter_0000100/mp_rank_01/model_optim_rng.pt

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


def get_checkpoint_name(checkpoints_path: str, iteration: int | str, mp_rank: int | None = None) -> str:
    """Path of one model-parallel rank's file for ``iteration`` (an int or ``"release"``)."""
    directory = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    rank = mpu.get_model_parallel_rank() if mp_rank is None else mp_rank
    return os.path.join(checkpoints_path, directory, f"mp_rank_{rank:02d}", CHECKPOINT_FILENAME)


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


def write_checkpoint_files(save_dir: str, iteration: int | str, states: list[dict[str, Any]]) -> None:
    """Write every model-parallel rank's file of one checkpoint from a single process (the conversion
    tools), then the tracker, so the directory names the checkpoint only once it is complete."""
    for rank, state in enumerate(states):
        _atomic_torch_save(state, get_checkpoint_name(save_dir, iteration, rank))
    _atomic_write_text(get_checkpoint_tracker_filename(save_dir), f"{iteration}\n")


def read_all_ranks(load_dir: str) -> tuple[int | str, list[dict[str, Any]]]:
    """The tracked iteration of ``load_dir`` and every model-parallel rank's state, in rank order."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"{load_dir}: no such directory")
    iteration = read_tracker(load_dir)
    untracked = untracked_checkpoints(load_dir, "")
    if untracked is not None:
        raise CheckpointError(untracked)
    if iteration is None:
        raise CheckpointError(f"{load_dir}: no checkpoint there (no {TRACKER_FILENAME}); point at a directory "
                              "written by --save")
    folder = os.path.dirname(os.path.dirname(get_checkpoint_name(load_dir, iteration, 0)))
    ranks = sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_")) if os.path.isdir(folder) else []
    if not ranks:
        raise CheckpointError(f"{folder}: missing; the tracker names iteration {iteration} but its files are gone")
    states = []
    for rank in range(len(ranks)):
        path = get_checkpoint_name(load_dir, iteration, rank)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
        if state.get("model_parallel_size", len(ranks)) != len(ranks):
            raise CheckpointError(f"{path}: says model-parallel size {state['model_parallel_size']} but {folder} "
                                  f"holds {len(ranks)} rank folders")
        states.append(state)
    return iteration, states


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


def load_checkpoint_state(load_dir: str, untracked_remedy: str | None = "") -> dict[str, Any] | None:
    """This model-parallel rank's checkpoint from ``load_dir``, or ``None`` when there is none.

    A directory written with another model-parallel size is a ``CheckpointError`` naming both; so is one
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
    path = get_checkpoint_name(load_dir, iteration)
    if not os.path.isfile(path):
        saved = sorted(
            d for d in os.listdir(os.path.dirname(os.path.dirname(path))) if d.startswith("mp_rank_")
        ) if os.path.isdir(os.path.dirname(os.path.dirname(path))) else []
        if saved:
            raise CheckpointError(
                f"{load_dir}: checkpoint was saved with model-parallel size {len(saved)}, this run uses "
                f"--model-parallel-size {mp_size}; run with --model-parallel-size {len(saved)}, or convert it with "
                f"tools/reshard_checkpoint.py --load {load_dir} --target-model-parallel-size {mp_size} --save NEW_DIR"
            )
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
            f"{path}: checkpoint was saved with model-parallel size {saved_mp}, this run uses "
            f"--model-parallel-size {mp_size}; run with --model-parallel-size {saved_mp}, or convert it with "
            f"tools/reshard_checkpoint.py --load {load_dir} --target-model-parallel-size {mp_size} --save NEW_DIR"
        )
    return state


def check_config(path: str, saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Raise ``CheckpointError`` naming the first model-shape field that differs."""
    for key in keys:
        if key in saved and saved[key] != current[key]:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={saved[key]}, this run has {key}={current[key]}; "
                "pass the flags the checkpoint was trained with"
            )
