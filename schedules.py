"""Schedules of one iteration's micro-batches over the stages of a pipeline.

A schedule is a list of operations per pipeline rank: ``Op("F", chunk, j)`` runs micro-batch ``j``
forward through this rank's layer chunk ``chunk`` (0 without virtual stages), ``Op("B", chunk, j)``
runs it backward. ``run_schedule`` executes a rank's list: a forward on a stage after the first
receives its input from the previous stage, a forward on a stage before the last sends its output on;
a backward receives its output's gradient from the next stage and sends its input's gradient back.
Sends are asynchronous and receives block, so a rank proceeds as soon as what it needs has arrived.

* ``no_pipelining_order``: forward and backward of each micro-batch in turn (one stage; activations
  of one micro-batch live at a time): gradient accumulation.
* ``all_forward_all_backward_order``: every forward, then every backward (GPipe): activations of all
  ``m`` micro-batches live at once, the bubble is ``(p - 1) / m`` of the ideal time.
* ``one_f_one_b_order``: stage ``r`` runs ``p - r - 1`` warm-up forwards, then alternates one forward
  and one backward, then drains the backwards: the same bubble, but at most ``p - r`` micro-batches'
  activations live at once (PipeDream-Flush, Megatron's default).
* ``interleaved_order``: each rank holds ``v`` chunks of layers (virtual stages ``c * p + r``); the
  1F1B pattern over micro-batches in groups of ``p`` shrinks the bubble to ``(p - 1) / (v m)``
  (Narayanan et al. 2021). Needs ``m`` divisible by ``p``.

The loss of each micro-batch counts ``1 / m`` (the step sees their mean) and exists on the last stage
only; ``share_from_last_stage`` gives its metrics to every stage, so rank 0 logs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

import mpu
from model.distributed import unwrap_model
from mpu import p2p


class Op(NamedTuple):
    kind: str  # "F" forward or "B" backward
    chunk: int
    micro_batch: int


def no_pipelining_order(num_micro_batches: int) -> list[Op]:
    return [op for j in range(num_micro_batches) for op in (Op("F", 0, j), Op("B", 0, j))]


def all_forward_all_backward_order(num_micro_batches: int) -> list[Op]:
    return ([Op("F", 0, j) for j in range(num_micro_batches)]
            + [Op("B", 0, j) for j in range(num_micro_batches)])


def one_f_one_b_order(pipeline_size: int, rank: int, num_micro_batches: int) -> list[Op]:
    warmup = min(pipeline_size - rank - 1, num_micro_batches)
    ops = [Op("F", 0, j) for j in range(warmup)]
    for i in range(num_micro_batches - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    return ops + [Op("B", 0, j) for j in range(num_micro_batches - warmup, num_micro_batches)]


def interleaved_order(pipeline_size: int, rank: int, num_micro_batches: int, num_chunks: int) -> list[Op]:
    """Megatron's interleaved 1F1B: forward step ``k`` runs chunk ``(k // p) % v`` on micro-batch
    ``(k // (p v)) p + k % p``; backward step ``k`` the same micro-batch through chunk ``v - 1 - (k // p) % v``."""
    p, v, m = pipeline_size, num_chunks, num_micro_batches
    if m % p:
        raise ValueError(f"the interleaved schedule needs the micro-batches per iteration ({m}) to be a multiple of "
                         f"the pipeline size ({p})")
    total = m * v

    def micro_batch(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def forward(k: int) -> Op:
        return Op("F", (k // p) % v, micro_batch(k))

    def backward(k: int) -> Op:
        return Op("B", v - 1 - (k // p) % v, micro_batch(k))

    warmup = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)
    ops = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [forward(warmup + i), backward(i)]
    return ops + [backward(k) for k in range(total - warmup, total)]


def forward_only_order(num_micro_batches: int, num_chunks: int = 1) -> list[Op]:
    return [Op("F", chunk, j) for j in range(num_micro_batches) for chunk in range(num_chunks)]


def training_order(num_micro_batches: int) -> list[Op]:
    """This rank's order for a training iteration under the current parallel layout: no pipelining
    with one stage, 1F1B with several, interleaved 1F1B with virtual stages."""
    p = mpu.get_pipeline_model_parallel_world_size()
    v = mpu.get_virtual_pipeline_model_parallel_world_size()
    if p == 1:
        return no_pipelining_order(num_micro_batches)
    rank = mpu.get_pipeline_model_parallel_rank()
    if v > 1:
        return interleaved_order(p, rank, num_micro_batches, v)
    return one_f_one_b_order(p, rank, num_micro_batches)


def _deferred(model: nn.Module, defer: bool):
    """The data-parallel wrapper's ``no_sync`` while ``defer``: reductions wait for the iteration's last
    backward (torch DDP decides at forward, the local DDP's overlapped hooks at backward)."""
    if defer and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _timed(timers, name: str):
    """``timers(name)`` around the block (``performance.Timers``), or nothing without timers."""
    if timers is None:
        yield
        return
    timers(name).start()
    try:
        yield
    finally:
        timers(name).stop()


def _set_input(model: nn.Module, tensor: torch.Tensor | None) -> None:
    if hasattr(model, "set_input_tensor"):
        model.set_input_tensor(tensor)
    elif tensor is not None:
        raise TypeError(f"{type(model).__name__} has no set_input_tensor: it cannot be a pipeline stage")


class ScheduleResult(NamedTuple):
    metrics: dict[str, torch.Tensor]
    """Per-micro-batch metrics summed (the last stage's; empty elsewhere)."""
    finite: list[torch.Tensor]
    """Whether each micro-batch's loss was finite (the last stage's; empty elsewhere)."""


class _Executor:
    """One rank's run of a schedule: what its forwards left for their backwards, the sends in flight, and
    the last stage's metrics."""

    def __init__(self, order: list[Op], forward_step: Callable, batches: list[Any], model: nn.Module,
                 backward: Callable[[torch.Tensor], None] | None, timers) -> None:
        self.forward_step, self.batches, self.model, self.backward_fn = forward_step, batches, model, backward
        self.timers = timers
        self.bare = unwrap_model(model)
        self.device = next(self.bare.parameters()).device
        last_backward = next((op for op in reversed(order) if op.kind == "B"), None)
        # Data-parallel reductions wait for the iteration's last backward (and its micro-batch's forward).
        self.sync_at = None if last_backward is None else last_backward[1:]
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.pending: p2p.Pending = []
        self.result = ScheduleResult({}, [])

    def _waiting(self, waits: bool):
        return _timed(self.timers, "pipeline") if waits else contextlib.nullcontext()

    def forward(self, op: Op, first: bool, last: bool) -> None:
        with self._waiting(not first):
            inputs = None if first else p2p.recv_forward(self.device)
        if self.backward_fn is None and inputs is not None:
            inputs.requires_grad_(False)
        _set_input(self.bare, inputs)
        defer = self.sync_at is not None and (op.chunk, op.micro_batch) != self.sync_at
        with _timed(self.timers, "forward"), _deferred(self.model, defer):
            output, values = self.forward_step(self.batches[op.micro_batch], self.model)
        if last:
            self.result.finite.append(torch.isfinite(output.detach()).all())
            metrics = self.result.metrics
            for key, value in values.items():
                metrics[key] = metrics[key] + value if key in metrics else value
            if len(self.batches) > 1:
                output = output / len(self.batches)
        else:
            self.pending += p2p.send_forward(output)
        if self.backward_fn is not None:
            self.saved[op.chunk, op.micro_batch] = (inputs, output)

    def backward(self, op: Op, first: bool, last: bool) -> None:
        inputs, output = self.saved.pop((op.chunk, op.micro_batch))
        with self._waiting(not last):
            output_grad = None if last else p2p.recv_backward(self.device)
        defer = (op.chunk, op.micro_batch) != self.sync_at
        with _timed(self.timers, "backward"), _deferred(self.model, defer):
            if output_grad is None:
                self.backward_fn(output)
            else:
                torch.autograd.backward(output, grad_tensors=output_grad)
        if not first:
            self.pending += p2p.send_backward(inputs.grad)

    def finish(self) -> None:
        with self._waiting(bool(self.pending)):
            p2p.wait_all(self.pending)


def run_schedule(order: list[Op], forward_step: Callable, batches: list[Any], model: nn.Module,
                 backward: Callable[[torch.Tensor], None] | None, timers=None) -> ScheduleResult:
    """Execute ``order`` on this rank. ``backward(loss)`` starts backward from a last stage's scaled loss
    (the optimizer's, which applies the loss scale); ``None`` runs forward only. Each loss counts
    ``1 / len(batches)``. ``timers`` (``performance.Timers``) time ``forward``, ``backward`` and
    ``pipeline``: the time spent waiting for the other stages' messages (this stage's share of the bubble)."""
    run = _Executor(order, forward_step, batches, model, backward, timers)
    try:
        for op in order:
            mpu.set_virtual_pipeline_model_parallel_rank(op.chunk)
            step = run.forward if op.kind == "F" else run.backward
            step(op, mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage())
        run.finish()
    finally:
        mpu.set_virtual_pipeline_model_parallel_rank(0)
        _set_input(run.bare, None)
    return run.result


def share_from_last_stage(metrics: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The last pipeline stage's metrics on every stage of its pipeline (one small broadcast); as they are
    without pipeline parallelism."""
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    message = [{key: float(value) for key, value in metrics.items()} if last else None]
    dist.broadcast_object_list(message, src=mpu.get_pipeline_model_parallel_last_rank(),
                               group=mpu.get_pipeline_model_parallel_group())
    if last:
        return metrics
    return {key: torch.tensor(value, dtype=torch.float32, device=device) for key, value in message[0].items()}
