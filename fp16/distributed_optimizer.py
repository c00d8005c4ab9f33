"""The optimizer state sharded over the data-parallel group (``--use-distributed-optimizer``).

With Adam every data-parallel rank of a plain run holds the same fp32 master weights and two fp32
moments for every parameter: 12 bytes per parameter under fp16/bf16 (8 under fp32, whose masters are
the weights), however many ranks share the work. ``DistributedOptimizer`` keeps them for a contiguous
``1 / data-parallel size`` of the parameters only, as Megatron's distributed optimizer and ZeRO stage 1
do. A step:

1. the gradients of all parameters, laid end to end in the optimizer's parameter order (the *flat
   order*), are averaged over the data-parallel group with one reduce-scatter, so that each rank
   receives the averaged gradient of its own shard only, in fp32 (it replaces the data-parallel
   all-reduce: the model's ``allreduce_gradients`` is not called);
2. the shard's gradients are unscaled, the global norm is summed over the shards (and the
   model-parallel group, counting replicated parameters once) and clipped; an overflow on any rank
   skips the step on every rank, as with ``FP16_Optimizer``;
3. the wrapped torch optimizer updates the shard's fp32 masters (for fp32 parameters, views of the
   weights themselves, so no copy is kept);
4. the updated shards are all-gathered and copied into every rank's weights.

Adam is elementwise, so cutting parameters at shard borders changes nothing: a run equals the plain
one up to the order of floating-point sums. ``state_dict`` (a collective: every data-parallel rank
calls it) gathers the full state into ``FP16_Optimizer``'s format, so a checkpoint loads at any
data-parallel size, with or without the flag; ``load_state_dict`` takes that format and keeps its shard.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import nn

import mpu

from .fp16 import any_rank_overflowed
from .loss_scaler import LossScaler

# torch renamed the tensor collectives (2.9); the old names still work, with a warning.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass
class _Piece:
    """The part of one parameter that lies in this rank's shard: elements ``[start, end)`` of the
    flattened parameter, at ``offset`` in the shard."""

    param: nn.Parameter
    start: int
    end: int
    offset: int
    master: nn.Parameter
    counted: bool  # contributes to the gradient norm on this model-parallel rank (partitioned, or rank 0)


class DistributedOptimizer:
    """Wraps ``optimizer`` (built over the model's parameters, no state yet) so that this rank keeps
    and updates only its shard of the fp32 masters and the optimizer state. Drop-in for
    ``FP16_Optimizer``: ``backward(loss)``, ``step(max_norm, nonfinite_loss) -> (grad_norm, skipped)``.

    ``reduces_gradients``: the training step leaves the data-parallel gradient reduction to ``step``.
    """

    reduces_gradients = True

    def __init__(self, optimizer: torch.optim.Optimizer, loss_scaler: LossScaler | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler or LossScaler(1.0)
        self.group = group if group is not None else mpu.get_data_parallel_group()
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.model_params: list[nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        self.numel = sum(p.numel() for p in self.model_params)
        self.shard_size = -(-self.numel // self.size)
        first = self.rank * self.shard_size
        last = min(first + self.shard_size, self.numel)
        first_model_rank = mpu.get_model_parallel_rank() == 0
        self.pieces: list[_Piece] = []
        self._offsets: list[int] = []
        position = 0
        for group_ in optimizer.param_groups:
            masters = []
            for param in group_["params"]:
                self._offsets.append(position)
                start, end = max(first, position) - position, min(last, position + param.numel()) - position
                if start < end:
                    flat = param.detach().view(-1)[start:end]
                    # fp32 weights are their own masters: the shard's slice of them, updated in place.
                    master = nn.Parameter(flat if param.dtype == torch.float32 else flat.float().clone())
                    counted = mpu.counts_in_norm(param, first_model_rank)
                    self.pieces.append(_Piece(param, start, end, position + start - first, master, counted))
                    masters.append(master)
                position += param.numel()
            group_["params"] = masters

    # --- the FP16_Optimizer interface ---------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            param.grad = None
        for piece in self.pieces:
            piece.master.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss * loss_scale``, in fp32."""
        (loss.float() * self.loss_scale).backward()

    def _flat_gradients(self, device: torch.device) -> torch.Tensor:
        """Every parameter's gradient in flat order, fp32, divided by the group size (zeros where a
        parameter got none), padded to a whole number of shards."""
        flat = torch.zeros(self.shard_size * self.size, dtype=torch.float32, device=device)
        for param, offset in zip(self.model_params, self._offsets, strict=True):
            if param.grad is not None:
                flat[offset:offset + param.numel()].copy_(param.grad.detach().reshape(-1))
        return flat.div_(self.size)

    def _reduce_scatter_gradients(self) -> None:
        """Average the gradients over the group; this rank's shard lands in its masters' ``.grad``."""
        device = mpu.collective_device(self.group)
        flat = self._flat_gradients(device)
        shard = torch.empty(self.shard_size, dtype=torch.float32, device=device)
        if self.size > 1:
            _reduce_scatter(shard, flat, group=self.group)
        else:
            shard.copy_(flat)
        inverse = 1.0 / self.loss_scale
        for piece in self.pieces:
            grad = shard[piece.offset:piece.offset + piece.end - piece.start].to(piece.master.device)
            piece.master.grad = grad.mul_(inverse) if inverse != 1.0 else grad

    def _grad_norm(self, norm_type: float) -> float:
        """The norm of the whole model's gradient: each element once over the data-parallel shards and the
        model-parallel ranks."""
        grads = [piece.master.grad for piece in self.pieces if piece.counted]
        device = mpu.collective_device()
        if norm_type == math.inf:
            local = torch.stack([g.abs().max() for g in grads]).max() if grads else torch.zeros(())
            total = local.to(device=device, dtype=torch.float32)
            op = dist.ReduceOp.MAX
        else:
            local = torch.stack(torch._foreach_norm(grads, norm_type)).pow(norm_type).sum() if grads \
                else torch.zeros(())
            total = local.to(device=device, dtype=torch.float32)
            op = dist.ReduceOp.SUM
        if self.size > 1:
            dist.all_reduce(total, op=op, group=self.group)
        if dist.get_world_size(mpu.norm_group()) > 1:  # the model-parallel ranks of every pipeline stage
            dist.all_reduce(total, op=op, group=mpu.norm_group())
        return total.item() if norm_type == math.inf else total.item() ** (1.0 / norm_type)

    def _all_gather_weights(self) -> None:
        """Every rank's updated shard into every rank's weights."""
        device = mpu.collective_device(self.group)
        shard = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        for piece in self.pieces:
            shard[piece.offset:piece.offset + piece.end - piece.start].copy_(piece.master.detach())
        if self.size > 1:
            full = torch.empty(self.shard_size * self.size, dtype=torch.float32, device=device)
            _all_gather(full, shard, group=self.group)
        else:
            full = shard
        with torch.no_grad():
            for param, offset in zip(self.model_params, self._offsets, strict=True):
                param.view(-1).copy_(full[offset:offset + param.numel()])

    def step(self, max_norm: float = math.inf, nonfinite_loss: bool = False) -> tuple[float, bool]:
        """Reduce-scatter, unscale, clip to ``max_norm``, step the shard and all-gather the weights; skip on
        every rank when any rank's gradient norm (or, with ``nonfinite_loss``, its loss) is not finite."""
        self._reduce_scatter_gradients()
        grad_norm = self._grad_norm(2.0)
        overflow = any_rank_overflowed(grad_norm, nonfinite_loss)
        self.loss_scaler.update_scale(overflow)
        if overflow:
            self.zero_grad()
            return grad_norm, True
        clip_coef = max_norm / (grad_norm + 1e-6)
        if clip_coef < 1 and self.pieces:
            torch._foreach_mul_([piece.master.grad for piece in self.pieces], clip_coef)
        self.optimizer.step()
        self._all_gather_weights()
        return grad_norm, False

    # --- memory -------------------------------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: its masters (not for fp32 weights: those are the
        weights) and the wrapped optimizer's state."""
        masters = sum(p.master.numel() * 4 for p in self.pieces if p.param.dtype != torch.float32)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        return masters + state

    # --- checkpoints --------------------------------------------------------------------------------------------------

    def _gather_full(self, values: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Whole per-parameter tensors from each piece's ``values`` (by piece index) on every rank."""
        device = mpu.collective_device(self.group)
        shard = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        for index, piece in enumerate(self.pieces):
            if index in values:
                shard[piece.offset:piece.offset + piece.end - piece.start].copy_(values[index].reshape(-1))
        full = torch.empty(self.shard_size * self.size, dtype=torch.float32, device=device)
        if self.size > 1:
            _all_gather(full, shard, group=self.group)
        else:
            full = shard
        return [full[offset:offset + p.numel()].view_as(p).to(p.device).clone()
                for p, offset in zip(self.model_params, self._offsets, strict=True)]

    def state_dict(self) -> dict:
        """The full state in ``FP16_Optimizer.state_dict``'s format (a collective over the group)."""
        inner = self.optimizer.state_dict()
        keys = sorted({k for s in self.optimizer.state.values() for k, v in s.items() if _per_element(v)})
        full = {key: self._gather_full({i: self.optimizer.state[p.master][key] for i, p in enumerate(self.pieces)
                                        if key in self.optimizer.state.get(p.master, {})}) for key in keys}
        scalars = {}  # per-parameter scalars (Adam's step) are the same on every piece: take any rank's
        for piece in self.pieces:
            scalars = {k: v for k, v in self.optimizer.state.get(piece.master, {}).items() if k not in keys}
            if scalars:
                break
        scalars = _agree_on_scalars(scalars, self.group)
        state = {}
        if keys:
            for index in range(len(self.model_params)):
                state[index] = {**{k: v.clone() for k, v in scalars.items()}, **{k: full[k][index] for k in keys}}
        groups, position = [], 0
        for saved, count in zip(inner["param_groups"], self.group_sizes, strict=True):
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": list(range(position, position + count))})
            position += count
        masters = self._gather_full({i: p.master.detach() for i, p in enumerate(self.pieces)})
        return {
            "optimizer": {"state": state, "param_groups": groups},
            "loss_scaler": self.loss_scaler.state_dict(),
            "fp32_master_params": [m for m, p in zip(masters, self.model_params, strict=True)
                                   if p.dtype != torch.float32],
        }

    def reload_model_params(self) -> None:
        """Refresh the masters from the model's weights (after loading weights into the model)."""
        with torch.no_grad():
            for piece in self.pieces:
                if piece.param.dtype != torch.float32:  # fp32 masters are views of the weights
                    piece.master.copy_(piece.param.detach().view(-1)[piece.start:piece.end])

    def load_state_dict(self, state: dict) -> None:
        """Restore the full state (``FP16_Optimizer``'s format, from any data-parallel size) into this
        rank's shard; masters from the saved fp32 copies when they match, else from the weights."""
        saved = state["optimizer"]
        if state["loss_scaler"].get("kind") == self.loss_scaler.state_dict()["kind"]:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        by_param = {id(p): i for i, p in enumerate(self.model_params)}
        inner_state, inner_groups, position = {}, [], 0
        index_of = {id(m): i for i, m in enumerate(m for g in self.optimizer.param_groups for m in g["params"])}
        for piece in self.pieces:
            entry = saved["state"].get(by_param[id(piece.param)], saved["state"].get(str(by_param[id(piece.param)])))
            if entry is None:
                continue
            inner_state[index_of[id(piece.master)]] = {
                k: (v.reshape(-1)[piece.start:piece.end].clone() if _per_element(v) else v)
                for k, v in entry.items()}
        for group_, saved_group in zip(self.optimizer.param_groups, saved["param_groups"], strict=True):
            count = len(group_["params"])  # this rank's pieces
            inner_groups.append({**{k: v for k, v in saved_group.items() if k != "params"},
                                 "params": list(range(position, position + count))})
            position += count
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        half = [i for i, p in enumerate(self.model_params) if p.dtype != torch.float32]
        masters = state.get("fp32_master_params", [])
        if len(masters) != len(half):
            self.reload_model_params()
            return
        full = dict(zip(half, masters, strict=True))
        with torch.no_grad():
            for piece in self.pieces:
                index = by_param[id(piece.param)]
                if index in full:
                    piece.master.copy_(full[index].reshape(-1)[piece.start:piece.end])
                    piece.param.view(-1)[piece.start:piece.end].copy_(piece.master)
        self._all_gather_weights()


def _per_element(value) -> bool:
    """Optimizer state with one entry per parameter element (Adam's moments), not a scalar (its step)."""
    return torch.is_tensor(value) and value.dim() > 0


def _agree_on_scalars(scalars: dict, group: dist.ProcessGroup) -> dict:
    """Per-parameter scalar state (Adam's step) from a rank that has any (a rank may hold no piece)."""
    gathered: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {k: v.item() if torch.is_tensor(v) else v for k, v in scalars.items()},
                           group=group)
    found = next((g for g in gathered if g), {})
    return {k: torch.tensor(float(v), dtype=torch.float32) for k, v in found.items()}
