"""Data parallelism over the data-parallel group, leaving model-parallel groups alone.

Two implementations, chosen by ``--DDP-impl``:

* ``local``: :class:`DistributedDataParallel` below. Backward runs untouched; afterwards
  ``allreduce_gradients()`` sums the gradients over the data-parallel group in a few flat buckets
  and divides by the group size. Simple and memory-light.
* ``torch``: ``torch.nn.parallel.DistributedDataParallel`` on the data-parallel process group,
  which overlaps the reduction with backward (faster at scale, more memory).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import mpu


class DistributedDataParallel(nn.Module):
    """Wraps ``module``; call ``allreduce_gradients()`` after backward.

    Parameters start identical on every data-parallel rank (broadcast from the group's first
    rank). Gradients are reduced in buckets of at most ``bucket_size`` elements per dtype; with
    ``fp32_allreduce`` half-precision buckets are summed in fp32.
    """

    def __init__(self, module: nn.Module, fp32_allreduce: bool = False, bucket_size: int = 2**24) -> None:
        super().__init__()
        self.module = module
        self.fp32_allreduce = fp32_allreduce
        self.bucket_size = bucket_size
        self.group = mpu.get_data_parallel_group()
        self.world_size = mpu.get_data_parallel_world_size()
        if self.world_size > 1:
            src = dist.get_global_rank(self.group, 0)
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src, group=self.group)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def _buckets(self) -> list[list[torch.Tensor]]:
        by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        for param in self.module.parameters():
            if param.grad is None:
                continue
            buckets = by_dtype.setdefault(param.grad.dtype, [[]])
            if buckets[-1] and sum(g.numel() for g in buckets[-1]) + param.numel() > self.bucket_size:
                buckets.append([])
            buckets[-1].append(param.grad.data)
        return [bucket for buckets in by_dtype.values() for bucket in buckets if bucket]

    def allreduce_gradients(self) -> None:
        """Average every gradient over the data-parallel group."""
        if self.world_size == 1:
            return
        for grads in self._buckets():
            flat = _flatten_dense_tensors(grads)
            if self.fp32_allreduce:
                flat = flat.float()
            flat.div_(self.world_size)
            dist.all_reduce(flat, group=self.group)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def _fp32_allreduce_hook(group, bucket):  # unannotated: torch checks annotations, and ours are strings
    """torch DDP communication hook: average a bucket in fp32 whatever the gradients' dtype."""
    buffer = bucket.buffer()
    reduced = buffer.float().div_(dist.get_world_size(group))
    future = dist.all_reduce(reduced, group=group, async_op=True).get_future()

    def cast_back(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(cast_back)


def wrap_data_parallel(module: nn.Module, impl: str, device: torch.device, fp32_allreduce: bool) -> nn.Module:
    """Wrap ``module`` for data parallelism with ``--DDP-impl`` ``local`` or ``torch``."""
    if impl == "local":
        return DistributedDataParallel(module, fp32_allreduce=fp32_allreduce)
    if impl == "torch":
        device_ids = [device.index] if device.type == "cuda" else None
        group = mpu.get_data_parallel_group()
        ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=device_ids, output_device=device_ids[0] if device_ids else None,
            process_group=group,
        )
        if fp32_allreduce:
            ddp.register_comm_hook(group, _fp32_allreduce_hook)
        return ddp
    raise ValueError(f"unknown --DDP-impl {impl!r}; choose local or torch")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under any data-parallel or precision wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
