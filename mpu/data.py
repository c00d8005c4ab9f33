"""Broadcasting a batch from the first rank of each model-parallel group to the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .initialize import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
)
from .utils import collective_device

_MAX_DIMS = 8


def _check_batch(
    keys: Sequence[str], data: Mapping[str, torch.Tensor] | None, datatype: torch.dtype
) -> Exception | None:
    """The error the source rank's batch deserves, or ``None`` when it can be sent."""
    if data is None:
        return ValueError("broadcast_data: the model-parallel source rank must pass the data")
    for key in keys:
        if key not in data:
            return KeyError(f"broadcast_data: key {key!r} missing from the batch (has {sorted(data)})")
        tensor = data[key]
        if tensor.dtype != datatype:
            return TypeError(f"broadcast_data: {key!r} has dtype {tensor.dtype}, expected {datatype}")
        if tensor.dim() > _MAX_DIMS:
            return ValueError(f"broadcast_data: {key!r} has {tensor.dim()} dims, at most {_MAX_DIMS}")
    return None


def broadcast_data(
    keys: Sequence[str], data: Mapping[str, torch.Tensor] | None, datatype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Send ``data[key]`` for each key from the model-parallel source rank to its group.

    Only the source rank needs ``data``; every tensor there must have dtype ``datatype``. Sizes
    travel first, then one flattened buffer. A batch the source rejects raises there and, instead of
    a hang, a ``RuntimeError`` on the other ranks. Returns the tensors on every rank of the group, on
    the device the group's backend communicates on.
    """
    group = get_model_parallel_group()
    src = get_model_parallel_src_rank()
    device = collective_device(group)
    is_src = get_model_parallel_rank() == 0

    # Slot 0: 1 when the source rejected the batch; then per key [ndim, d0, d1, ...], padded.
    width = _MAX_DIMS + 1
    sizes = torch.zeros(1 + len(keys) * width, dtype=torch.int64, device=device)
    error = _check_batch(keys, data, datatype) if is_src else None
    if error is not None:
        sizes[0] = 1
    elif is_src:
        for i, key in enumerate(keys):
            tensor = data[key]
            sizes[1 + i * width] = tensor.dim()
            sizes[2 + i * width : 2 + i * width + tensor.dim()] = torch.tensor(tensor.shape)
    if get_model_parallel_world_size() > 1:
        dist.broadcast(sizes, src, group=group)
    if error is not None:
        raise error
    if sizes[0].item():
        raise RuntimeError("broadcast_data: the model-parallel source rank rejected the batch (see its error)")

    table = sizes[1:].view(len(keys), width).tolist()
    shapes = [row[1 : 1 + row[0]] for row in table]
    numels = [int(torch.Size(s).numel()) for s in shapes]

    if is_src:
        flat = torch.cat([data[key].contiguous().view(-1).to(device) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    if get_model_parallel_world_size() > 1:
        dist.broadcast(flat, src, group=group)

    output = {}
    offset = 0
    for key, shape, numel in zip(keys, shapes, numels):
        output[key] = flat.narrow(0, offset, numel).view(shape)
        offset += numel
    return output
