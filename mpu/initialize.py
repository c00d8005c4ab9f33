"""The one place that holds tensor-, pipeline- and data-parallel state.

"Model parallel" keeps its 2019 meaning: tensor parallelism, the layers' matrices split over a group
of ranks. Pipeline parallelism splits the layers themselves into stages; data parallelism replicates
the whole. Ranks are laid out with the tensor rank fastest, then the data-parallel rank, then the
pipeline stage (Megatron's order). With a world of 8, tensor size 2 and pipeline size 2::

    model-parallel (tensor) groups: [0, 1] [2, 3] [4, 5] [6, 7]
    data-parallel groups:           [0, 2] [1, 3] [4, 6] [5, 7]
    pipeline groups:                [0, 4] [1, 5] [2, 6] [3, 7]
    embedding groups:               the first and last stage of each pipeline group

Consecutive ranks share a node, so the chatty tensor-parallel collectives stay on the fast links and
the pipeline's point-to-point messages are the ones that cross nodes. Without pipeline parallelism
(size 1) the layout is the 2019 one.

With virtual stages (the interleaved schedule) each pipeline rank holds several chunks of layers;
the schedule says which chunk runs through ``set_virtual_pipeline_model_parallel_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .utils import ensure_divisibility


@dataclass(frozen=True)
class _ParallelState:
    model_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    pipeline_group: dist.ProcessGroup
    embedding_group: dist.ProcessGroup | None
    model_and_pipeline_group: dist.ProcessGroup
    activation_group: dist.ProcessGroup
    gradient_group: dist.ProcessGroup
    model_parallel_size: int
    data_parallel_size: int
    pipeline_size: int
    model_parallel_rank: int
    data_parallel_rank: int
    pipeline_rank: int
    model_parallel_src_rank: int
    pipeline_ranks: tuple[int, ...]


_STATE: _ParallelState | None = None
_VIRTUAL_RANK = 0
_VIRTUAL_SIZE = 1


def _state() -> _ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "model parallelism is not initialized: call "
            "mpu.initialize_model_parallel(model_parallel_size) after torch.distributed.init_process_group"
        )
    return _STATE


def initialize_model_parallel(model_parallel_size: int, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: int = 1) -> None:
    """Build the tensor-, pipeline-, data-parallel and embedding groups of the current world.

    Every rank must call this, in the same order, since creating a group is collective.
    ``virtual_pipeline_model_parallel_size`` is the number of layer chunks per pipeline rank (1 for
    the plain schedules).
    """
    global _STATE, _VIRTUAL_RANK, _VIRTUAL_SIZE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "before mpu.initialize_model_parallel"
        )
    if _STATE is not None:
        raise RuntimeError("model parallelism is already initialized; call destroy_model_parallel first")
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    tp, pp = model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1 or virtual_pipeline_model_parallel_size < 1:
        raise ValueError(f"parallel sizes must be at least 1, got model-parallel {tp}, pipeline {pp}, "
                         f"virtual {virtual_pipeline_model_parallel_size}")
    try:
        ensure_divisibility(world_size, tp * pp)
    except ValueError:
        sizes = f"model-parallel size {tp}" + (f" x pipeline size {pp}" if pp > 1 else "")
        flags = "--model-parallel-size" + (" x --pipeline-model-parallel-size" if pp > 1 else "")
        raise ValueError(f"world size {world_size} is not divisible by {sizes}; launch a multiple of {flags} "
                         "processes") from None
    dp = world_size // (tp * pp)

    def global_rank(t: int, d: int, p: int) -> int:
        return (p * dp + d) * tp + t

    mine: dict[str, dist.ProcessGroup] = {}
    pipeline_ranks: tuple[int, ...] = ()

    def make(name: str, ranks: list[int]) -> None:
        # new_group is collective: every rank creates every group, keeps its own.
        group = dist.new_group(ranks)
        if rank in ranks:
            mine[name] = group

    for p in range(pp):
        for t in range(tp):
            make("data", [global_rank(t, d, p) for d in range(dp)])
        for d in range(dp):
            make("model", [global_rank(t, d, p) for t in range(tp)])
    for d in range(dp):
        for t in range(tp):
            ranks = [global_rank(t, d, p) for p in range(pp)]
            make("pipeline", ranks)
            # One communicator per direction of the schedules' messages: activations go forward, their
            # gradients backward, and each stream stays in order by itself (NCCL matches by order only).
            make("activations", ranks)
            make("gradients", ranks)
            make("embedding", sorted({ranks[0], ranks[-1]}))
            if rank in ranks:
                pipeline_ranks = tuple(ranks)
        make("model_and_pipeline", [global_rank(t, d, p) for p in range(pp) for t in range(tp)])
    _STATE = _ParallelState(
        model_parallel_group=mine["model"],
        data_parallel_group=mine["data"],
        pipeline_group=mine["pipeline"],
        embedding_group=mine.get("embedding"),  # a middle stage holds no embeddings
        model_and_pipeline_group=mine["model_and_pipeline"],
        activation_group=mine["activations"],
        gradient_group=mine["gradients"],
        model_parallel_size=tp,
        data_parallel_size=dp,
        pipeline_size=pp,
        model_parallel_rank=rank % tp,
        data_parallel_rank=(rank // tp) % dp,
        pipeline_rank=rank // (tp * dp),
        model_parallel_src_rank=rank - rank % tp,
        pipeline_ranks=pipeline_ranks,
    )
    _VIRTUAL_RANK, _VIRTUAL_SIZE = 0, virtual_pipeline_model_parallel_size


def model_parallel_is_initialized() -> bool:
    """Whether ``initialize_model_parallel`` has run (and not been undone)."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the groups so that ``initialize_model_parallel`` may run again."""
    global _STATE, _VIRTUAL_RANK, _VIRTUAL_SIZE
    if _STATE is not None:
        groups = {id(g): g for g in (_STATE.model_parallel_group, _STATE.data_parallel_group, _STATE.pipeline_group,
                                     _STATE.embedding_group, _STATE.model_and_pipeline_group,
                                     _STATE.activation_group, _STATE.gradient_group) if g is not None}
        for group in groups.values():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError):
                pass  # the default group may already be gone at shutdown
    _STATE = None
    _VIRTUAL_RANK, _VIRTUAL_SIZE = 0, 1


def get_model_parallel_group() -> dist.ProcessGroup:
    """The model-parallel (tensor-parallel) group this rank belongs to."""
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


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    """The ranks holding the other stages of this rank's copy of the model (same tensor and data rank)."""
    return _state().pipeline_group


def get_pipeline_model_parallel_world_size() -> int:
    return _state().pipeline_size if _STATE is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    return _state().pipeline_rank if _STATE is not None else 0


def get_pipeline_model_parallel_ranks() -> tuple[int, ...]:
    """Global ranks of this rank's pipeline group, stage 0 first."""
    return _state().pipeline_ranks


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around: the interleaved schedule's chunks go on)."""
    state = _state()
    return state.pipeline_ranks[(state.pipeline_rank + 1) % state.pipeline_size]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around)."""
    state = _state()
    return state.pipeline_ranks[(state.pipeline_rank - 1) % state.pipeline_size]


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage of this rank's pipeline."""
    return _state().pipeline_ranks[-1]


def get_embedding_group() -> dist.ProcessGroup | None:
    """The first and last stage of this rank's pipeline: the two holders of the tied word embeddings
    (``None`` on a stage between them)."""
    return _state().embedding_group


def get_model_and_pipeline_parallel_group() -> dist.ProcessGroup:
    """Every rank holding a part of this rank's copy of the model (all tensor ranks of all stages):
    the group over which a whole-model quantity such as the gradient norm is summed."""
    return _state().model_and_pipeline_group


def get_pipeline_message_groups() -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The pipeline group's two communicators for point-to-point messages: (activations, gradients)."""
    state = _state()
    return state.activation_group, state.gradient_group


def get_virtual_pipeline_model_parallel_world_size() -> int:
    """Chunks of layers per pipeline rank (1 unless the interleaved schedule is used)."""
    return _VIRTUAL_SIZE


def set_virtual_pipeline_model_parallel_world_size(chunks: int) -> None:
    """Set the chunks per pipeline rank once the model's depth is known (a run's ``--num-layers`` may
    come from its checkpoint, read after the groups exist)."""
    global _VIRTUAL_SIZE
    if chunks < 1:
        raise ValueError(f"virtual pipeline size must be at least 1, got {chunks}")
    _VIRTUAL_SIZE = chunks


def get_virtual_pipeline_model_parallel_rank() -> int:
    """The chunk the schedule is running now."""
    return _VIRTUAL_RANK


def set_virtual_pipeline_model_parallel_rank(chunk: int) -> None:
    global _VIRTUAL_RANK
    _VIRTUAL_RANK = chunk


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """Whether this rank (running its current chunk, unless ``ignore_virtual``) holds the first layers."""
    if not ignore_virtual and _VIRTUAL_RANK != 0:
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """Whether this rank (running its current chunk, unless ``ignore_virtual``) holds the last layers."""
    if not ignore_virtual and _VIRTUAL_RANK != get_virtual_pipeline_model_parallel_world_size() - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def pipeline_layer_chunks(num_layers: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` layer ranges this rank holds, one per virtual chunk.

    The layers are cut into ``pipeline size x virtual size`` equal stages; virtual stage
    ``v * pipeline_size + r`` is chunk ``v`` of pipeline rank ``r`` (the interleaved assignment).
    Without pipeline parallelism (or before initialisation) that is the whole stack.
    """
    return layer_chunks(num_layers, get_pipeline_model_parallel_world_size(), get_pipeline_model_parallel_rank(),
                        get_virtual_pipeline_model_parallel_world_size())


def layer_chunks(num_layers: int, pp: int, rank: int, virtual: int = 1) -> list[tuple[int, int]]:
    """``pipeline_layer_chunks`` of pipeline rank ``rank`` of ``pp`` with ``virtual`` chunks each."""
    stages = pp * virtual
    if num_layers % stages:
        raise ValueError(f"{num_layers} layers do not split into {pp} pipeline stages"
                         + (f" x {virtual} virtual stages" if virtual > 1 else "")
                         + "; choose sizes whose product divides --num-layers")
    per_stage = num_layers // stages
    return [((v * pp + rank) * per_stage, (v * pp + rank + 1) * per_stage) for v in range(virtual)]


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
