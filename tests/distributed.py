"""Run a function in N gloo processes on CPU, the way the distributed tests need it.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, joins them into one
gloo group over a free TCP port on 127.0.0.1, calls ``fn(*args)`` on each, tears the group down in
``finally`` and returns the per-rank return values. A child's exception fails the calling test
with that child's traceback; a child that hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, results, args) -> None:
    import torch
    import torch.distributed as dist

    import mpu

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Call ``fn(*args)`` in ``world_size`` gloo processes; return the values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic, so a worker may start data-loader processes; the ``finally`` below kills stragglers.
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, results, args), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.1)
                outcomes[rank] = (ok, value)
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now - failed_at > 5):
                break
            if all(p.exitcode is not None for p in procs) and results.empty():
                break  # every child is gone and nothing more will arrive
        for proc in procs:
            proc.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"--- rank {r} ---\n{value}" for r, (ok, value) in sorted(outcomes.items()) if not ok]
    missing = [r for r in range(world_size) if r not in outcomes]
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(f"ranks {missing} gave no result within {timeout}s (exit codes {codes})")
    return [outcomes[r][1] for r in range(world_size)]


def gather_full_parameters(module, grads: bool = False) -> dict:
    """Every parameter (or its gradient) of ``module`` as the full tensor, gathered over the
    model-parallel group with each parameter's own partition tags. Call inside a worker."""
    import torch
    import torch.distributed as dist

    import mpu

    full = {}
    group = mpu.get_model_parallel_group()
    world_size = mpu.get_model_parallel_world_size()
    for name, param in module.named_parameters():
        tensor = (param.grad if grads else param).detach()
        if getattr(param, "model_parallel", False) and world_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = mpu.merge_partitions(parts, param.partition_dim, param.partition_stride)
        full[name] = tensor.clone()
    return full
