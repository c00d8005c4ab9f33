"""Small helpers shared by the model-parallel layers."""

from __future__ import annotations

import torch
import torch.distributed as dist


def ensure_divisibility(numerator: int, denominator: int) -> None:
    """Raise ``ValueError`` unless ``numerator`` is divisible by ``denominator``."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")


def divide(numerator: int, denominator: int) -> int:
    """Integer division that insists on an exact result."""
    ensure_divisibility(numerator, denominator)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension.

    The chunks are views unless ``contiguous_split_chunks`` asks for copies.
    """
    last_dim = tensor.dim() - 1
    last_dim_size = divide(tensor.size()[last_dim], num_partitions)
    chunks = torch.split(tensor, last_dim_size, dim=last_dim)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


class VocabUtility:
    """The vocabulary range ``[first, last)`` owned by one model-parallel rank.

    The vocabulary is split into equal contiguous blocks, rank ``r`` owning block ``r``.
    """

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> tuple[int, int]:
        index_f = rank * per_partition_vocab_size
        return index_f, index_f + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(
        global_vocab_size: int, rank: int, world_size: int
    ) -> tuple[int, int]:
        per_partition_vocab_size = divide(global_vocab_size, world_size)
        return VocabUtility.vocab_range_from_per_partition_vocab_size(
            per_partition_vocab_size, rank, world_size
        )


def partition_tensor(
    full: torch.Tensor, world_size: int, rank: int, dim: int, stride: int = 1
) -> torch.Tensor:
    """Rank ``rank``'s partition of ``full`` along ``dim``, the way the parallel layers cut weights.

    ``dim`` is cut into ``stride * world_size`` equal blocks and rank ``r`` keeps blocks
    ``r, r + world_size, ...`` concatenated: with ``stride=3`` a fused ``[Q; K; V]`` gives each rank
    ``[Q_r; K_r; V_r]``.
    """
    block = divide(full.size(dim), stride * world_size)
    blocks = torch.split(full, block, dim=dim)
    return torch.cat(blocks[rank::world_size], dim=dim)


def merge_partitions(partitions: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of ``partition_tensor``: the full tensor from every rank's partition, in rank order."""
    world_size = len(partitions)
    per_rank = [torch.split(p, divide(p.size(dim), stride), dim=dim) for p in partitions]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(world_size)], dim=dim)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors must live to cross ``group`` (the default group when ``None``).

    NCCL moves CUDA tensors only; every other backend here works on CPU tensors.
    """
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
