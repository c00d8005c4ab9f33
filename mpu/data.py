"""Broadcasting a batch from the first rank of each model-parallel group to the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .initialize import get_model_parallel_group, get_model_parallel_rank, get_model_parallel_src_rank

_MAX_DIMS = 8


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """NCCL moves CUDA tensors only; every other backend here works on CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_data(
    keys: Sequence[str], data: Mapping[str, torch.Tensor] | None, datatype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Send ``data[key]`` for each key from the model-parallel source rank to its group.

    Only the source rank needs ``data``; every tensor there must have dtype ``datatype``. Sizes
    travel first, then one flattened buffer. Returns the tensors on every rank of the group, on
    the device the group's backend communicates on.
    """
    group = get_model_parallel_group()
    src = get_model_parallel_src_rank()
    device = _collective_device(group)
    is_src = get_model_parallel_rank() == 0

    # Per key: [ndim, d0, d1, ...], padded to a fixed width.
    width = _MAX_DIMS + 1
    sizes = torch.zeros(len(keys) * width, dtype=torch.int64, device=device)
    if is_src:
        if data is None:
            raise ValueError("broadcast_data: the model-parallel source rank must pass the data")
        for i, key in enumerate(keys):
            if key not in data:
                raise KeyError(f"broadcast_data: key {key!r} missing from the batch (has {sorted(data)})")
            tensor = data[key]
            if tensor.dtype != datatype:
                raise TypeError(
                    f"broadcast_data: {key!r} has dtype {tensor.dtype}, expected {datatype}"
                )
            if tensor.dim() > _MAX_DIMS:
                raise ValueError(f"broadcast_data: {key!r} has {tensor.dim()} dims, at most {_MAX_DIMS}")
            sizes[i * width] = tensor.dim()
            sizes[i * width + 1 : i * width + 1 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.broadcast(sizes, src, group=group)

    table = sizes.view(len(keys), width).tolist()
    shapes = [row[1 : 1 + row[0]] for row in table]
    numels = [int(torch.Size(s).numel()) for s in shapes]

    if is_src:
        flat = torch.cat([data[key].contiguous().view(-1).to(device) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    dist.broadcast(flat, src, group=group)

    output = {}
    offset = 0
    for key, shape, numel in zip(keys, shapes, numels):
        output[key] = flat.narrow(0, offset, numel).view(shape)
        offset += numel
    return output
