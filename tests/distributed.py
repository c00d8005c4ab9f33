"""Run a function in N gloo processes on CPU, the way the distributed tests need it.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (forked from a
server that has torch imported already), joins them into one gloo group over a free TCP port on
127.0.0.1, calls ``fn(*args)`` on each, tears the group down in ``finally`` and returns the per-rank
return values. A child's exception fails the calling test with that child's traceback; a child that
hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import socket
import tempfile
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


def _result_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank{rank}.result")


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, results, args, tag: int = 0,
           result_dir: str | None = None) -> None:
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
        # Pickled here by value: a tensor put on the queue as it is travels as a shared-memory handle,
        # which the parent cannot open once this rank has exited (EOFError / connection reset). A file
        # holds it too (renamed into place whole), which a busy machine's queue cannot lose.
        value = pickle.dumps(fn(*args))
        if result_dir is not None:
            with open(_result_path(result_dir, rank) + ".tmp", "wb") as f:
                f.write(value)
            os.replace(_result_path(result_dir, rank) + ".tmp", _result_path(result_dir, rank))
        results.put((tag, rank, True, value))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent
        results.put((tag, rank, False, traceback.format_exc()))
    finally:
        mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


# Starting a Python process that imports torch costs ~1.5 s, and the suite starts hundreds of ranks.
# One "fork server" is spawned on first use with torch and the project imported but nothing run
# (so forking it is safe); every call forks fresh ranks from it. Each rank is still a new process
# with no state from earlier tests, and gets the caller's environment and working directory.


def _forked_rank(payload: bytes, rank: int, world_size: int, port: int, results, env: dict, cwd: str,
                 tag: int, outputs: tuple[str, str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in zip((1, 2), outputs[:2]):  # the caller copies these to its own stdout/stderr (capfd sees them)
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    try:
        fn, args = pickle.loads(payload)
    except BaseException:  # noqa: BLE001
        results.put((tag, rank, False, traceback.format_exc()))
        return
    _child(fn, rank, world_size, port, results, args, tag, outputs[2])


def _fork_server(tasks, replies, results) -> None:
    import numpy  # noqa: F401 - warm imports, shared by every forked rank
    import torch  # noqa: F401

    import data_utils  # noqa: F401
    import model  # noqa: F401
    import mpu  # noqa: F401
    import training  # noqa: F401

    parent = os.getppid()
    ctx = mp.get_context("fork")
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # pytest is gone
                return
            continue
        if task is None:
            return
        tag, payload, world_size, port, env, cwd, outputs = task
        procs = [ctx.Process(target=_forked_rank,
                             args=(payload, rank, world_size, port, results, env, cwd, tag, outputs))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        replies.put((tag, "pids", [proc.pid for proc in procs]))
        for proc in procs:
            proc.join()
        replies.put((tag, "exit", [proc.exitcode for proc in procs]))


class _ForkServer:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.tasks, self.replies, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_fork_server, args=(self.tasks, self.replies, self.results), daemon=False)
        self.proc.start()
        self.tag = 0

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.tasks.put(None)
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


_SERVER: _ForkServer | None = None


def _server() -> _ForkServer:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = _ForkServer()
        atexit.register(_SERVER.stop)
    return _SERVER


def _reset_server() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        _SERVER = None


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Call ``fn(*args)`` in ``world_size`` gloo processes; return the values by rank."""
    server = _server()
    server.tag += 1
    tag = server.tag
    outputs = []
    for _ in range(2):
        fd, path = tempfile.mkstemp(prefix="run_distributed.", suffix=".out")
        os.close(fd)
        outputs.append(path)
    result_dir = tempfile.mkdtemp(prefix="run_distributed.")
    server.tasks.put((tag, pickle.dumps((fn, args)), world_size, free_port(), dict(os.environ), os.getcwd(),
                      (*outputs, result_dir)))
    try:
        return _collect(server, tag, world_size, timeout, result_dir)
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
        for fd, path in zip((1, 2), outputs):
            with open(path, "rb") as f:
                data = f.read()
            os.remove(path)
            while data:
                data = data[os.write(fd, data):]


def _collect(server: _ForkServer, tag: int, world_size: int, timeout: float, result_dir: str) -> list[Any]:
    """Wait for the ranks of call ``tag``; their values by rank, or an AssertionError. A value the queue
    did not deliver is read from the rank's result file."""

    def reply(kind: str, wait: float):
        end = time.monotonic() + wait
        while True:
            try:
                got_tag, got_kind, value = server.replies.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                return None
            if got_tag == tag and got_kind == kind:
                return value

    pids = reply("pids", 120)
    if pids is None:
        _reset_server()
        raise AssertionError("the test fork server did not start the ranks")
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    codes = None
    try:
        while len(outcomes) < world_size:
            try:
                got_tag, rank, ok, value = server.results.get(timeout=0.1)
                if got_tag != tag:
                    continue  # a straggler of an earlier, failed call
                outcomes[rank] = (ok, pickle.loads(value) if ok else value)
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now - failed_at > 5):
                break
            if codes is None:
                codes = reply("exit", 0.0)
            if codes is not None and server.results.empty():
                break  # every rank is gone; what the queue still lacks is in the result files
        if codes is None:
            codes = reply("exit", max(0.0, min(10.0, deadline - time.monotonic())))
    finally:
        if codes is None:
            _kill(pids)
            codes = reply("exit", 15)
            if codes is None:
                _reset_server()
    for rank in range(world_size):
        if rank not in outcomes and os.path.isfile(_result_path(result_dir, rank)):
            with open(_result_path(result_dir, rank), "rb") as f:
                outcomes[rank] = (True, pickle.loads(f.read()))
    errors = [f"--- rank {r} ---\n{value}" for r, (ok, value) in sorted(outcomes.items()) if not ok]
    missing = [r for r in range(world_size) if r not in outcomes]
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    if missing:
        exit_codes = {r: codes[r] if codes else None for r in missing}
        raise AssertionError(f"ranks {missing} gave no result within {timeout}s (exit codes {exit_codes})")
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
