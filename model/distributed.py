"""Data parallelism over the data-parallel group, leaving model-parallel groups alone.

Two implementations, chosen by ``--DDP-impl``:

* ``local``: :class:`DistributedDataParallel` below. Backward runs untouched; afterwards
  ``allreduce_gradients()`` sums the gradients over the data-parallel group in a few flat buckets
  and divides by the group size. Simple and memory-light. With ``overlap`` (``--overlap-grad-reduce``)
  each bucket's all-reduce starts, asynchronously, as soon as backward has produced all of its
  gradients, and ``allreduce_gradients()`` only waits for them: the same sums, hidden behind backward.
* ``torch``: ``torch.nn.parallel.DistributedDataParallel`` on the data-parallel process group,
  which overlaps the reduction with backward (faster at scale, more memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

    def __init__(self, module: nn.Module, fp32_allreduce: bool = False, bucket_size: int = 2**24,
                 overlap: bool = False) -> None:
        super().__init__()
        self.module = module
        self.fp32_allreduce = fp32_allreduce
        self.bucket_size = bucket_size
        self.group = mpu.get_data_parallel_group()
        self.world_size = mpu.get_data_parallel_world_size()
        self.overlap = overlap and self.world_size > 1
        self._sync = True  # False inside no_sync(): gradients accumulate without a reduction
        self._in_flight: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        if self.world_size > 1:
            src = dist.get_global_rank(self.group, 0)
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src, group=self.group)
        if self.overlap:
            self._install_hooks()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without starting reductions (the micro-batches
        before the last of an iteration); ``allreduce_gradients`` reduces the sum afterwards."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _install_hooks(self) -> None:
        """Buckets in reverse parameter order (about the order backward produces gradients), per dtype;
        a bucket's reduction starts when the last of its gradients has been accumulated."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        self._hook_buckets: list[list[nn.Parameter]] = []
        open_: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in reversed(params):
            bucket = open_.setdefault(param.dtype, [])
            if bucket and sum(p.numel() for p in bucket) + param.numel() > self.bucket_size:
                self._hook_buckets.append(bucket)
                bucket = open_[param.dtype] = []
            bucket.append(param)
        self._hook_buckets += [b for b in open_.values() if b]
        self._bucket_of = {id(p): i for i, b in enumerate(self._hook_buckets) for p in b}
        self._waiting = [len(b) for b in self._hook_buckets]
        for param in params:
            param.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        index = self._bucket_of[id(param)]
        self._waiting[index] -= 1
        if self._waiting[index] == 0:
            grads = [p.grad.data for p in self._hook_buckets[index]]
            self._in_flight.append((*self._start_reduction(grads), grads))

    def _start_reduction(self, grads: list[torch.Tensor]) -> tuple[dist.Work, torch.Tensor]:
        flat = _flatten_dense_tensors(grads)
        if self.fp32_allreduce:
            flat = flat.float()
        flat.div_(self.world_size)
        return dist.all_reduce(flat, group=self.group, async_op=True), flat

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
        """Average every gradient over the data-parallel group (with ``overlap``: wait for the reductions
        backward started, and reduce here any bucket whose gradients did not all arrive)."""
        if self.world_size == 1:
            return
        if not self.overlap:
            self._in_flight = [(*self._start_reduction(grads), grads) for grads in self._buckets()]
        else:
            for index, bucket in enumerate(self._hook_buckets):
                grads = [p.grad.data for p in bucket if p.grad is not None]
                if self._waiting[index] and grads:  # a parameter got no gradient this time
                    self._in_flight.append((*self._start_reduction(grads), grads))
            self._waiting = [len(b) for b in self._hook_buckets]
        for work, flat, grads in self._in_flight:
            work.wait()
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
        self._in_flight = []

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


def wrap_data_parallel(module: nn.Module, impl: str, device: torch.device, fp32_allreduce: bool,
                       overlap: bool = False) -> nn.Module:
    """Wrap ``module`` for data parallelism with ``--DDP-impl`` ``local`` (``overlap``: reductions started
    during backward) or ``torch``."""
    if impl == "local":
        return DistributedDataParallel(module, fp32_allreduce=fp32_allreduce, overlap=overlap)
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
