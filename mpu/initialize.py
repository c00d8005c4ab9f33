"""The one place that holds model- and data-parallel state.

Ranks are laid out with model-parallel groups of consecutive ranks and data-parallel groups of
strided ranks. With a world of 8 and a model-parallel size of 2::

    model-parallel groups: [0, 1] [2, 3] [4, 5] [6, 7]
    data-parallel groups:  [0, 2, 4, 6] [1, 3, 5, 7]

Consecutive ranks share a node, so the chatty model-parallel collectives stay on the fast links.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .utils import ensure_divisibility


@dataclass(frozen=True)
class _ParallelState:
    model_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    model_parallel_size: int
    data_parallel_size: int
    model_parallel_rank: int
    data_parallel_rank: int
    model_parallel_src_rank: int


_STATE: _ParallelState | None = None


def _state() -> _ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "model parallelism is not initialized: call "
            "mpu.initialize_model_parallel(model_parallel_size) after torch.distributed.init_process_group"
        )
    return _STATE


def initialize_model_parallel(model_parallel_size: int) -> None:
    """Build the model- and data-parallel groups of the current world.

    Every rank must call this, in the same order, since creating a group is collective.
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "before mpu.initialize_model_parallel"
        )
    if _STATE is not None:
        raise RuntimeError("model parallelism is already initialized; call destroy_model_parallel first")
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    if model_parallel_size < 1:
        raise ValueError(f"model-parallel size must be at least 1, got {model_parallel_size}")
    try:
        ensure_divisibility(world_size, model_parallel_size)
    except ValueError:
        raise ValueError(
            f"world size {world_size} is not divisible by model-parallel size {model_parallel_size}; "
            "launch a multiple of --model-parallel-size processes"
        ) from None
    data_parallel_size = world_size // model_parallel_size

    model_group = data_group = None
    # new_group is collective: every rank creates every group, keeps its own.
    for i in range(model_parallel_size):
        ranks = list(range(i, world_size, model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            data_group = group
    for i in range(data_parallel_size):
        ranks = list(range(i * model_parallel_size, (i + 1) * model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            model_group = group
    assert model_group is not None and data_group is not None
    _STATE = _ParallelState(
        model_parallel_group=model_group,
        data_parallel_group=data_group,
        model_parallel_size=model_parallel_size,
        data_parallel_size=data_parallel_size,
        model_parallel_rank=rank % model_parallel_size,
        data_parallel_rank=rank // model_parallel_size,
        model_parallel_src_rank=(rank // model_parallel_size) * model_parallel_size,
    )


def model_parallel_is_initialized() -> bool:
    """Whether ``initialize_model_parallel`` has run (and not been undone)."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the groups so that ``initialize_model_parallel`` may run again."""
    global _STATE
    if _STATE is not None:
        for group in (_STATE.model_parallel_group, _STATE.data_parallel_group):
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError):
                pass  # the default group may already be gone at shutdown
    _STATE = None


def get_model_parallel_group() -> dist.ProcessGroup:
    """The model-parallel group this rank belongs to."""
    return _state().model_parallel_group


def get_data_parallel_group() -> dist.ProcessGroup:
    """The data-parallel group this rank belongs to."""
    return _state().data_parallel_group


def get_model_parallel_world_size() -> int:
    return _state().model_parallel_size


def get_model_parallel_rank() -> int:
    return _state().model_parallel_rank


def get_model_parallel_src_rank() -> int:
    """Global rank of the first rank of this rank's model-parallel group."""
    return _state().model_parallel_src_rank


def get_data_parallel_world_size() -> int:
    return _state().data_parallel_size


def get_data_parallel_rank() -> int:
    return _state().data_parallel_rank


def group_world_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``, the model-parallel group when ``None``."""
    if group is None:
        return get_model_parallel_world_size()
    return dist.get_world_size(group=group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group``, the model-parallel group when ``None``."""
    if group is None:
        return get_model_parallel_rank()
    return dist.get_rank(group=group)


def is_rank_0() -> bool:
    """Whether this process is global rank 0 of the job, or the only process (no group yet): the one
    that prints, logs and writes files shared by the job."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
