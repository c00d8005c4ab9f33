"""Start and end of every process of a job: distributed set-up, seeds, rank-0 printing, agreement on
user mistakes, and the entry point wrapper that turns them into one line.

Entry scripts, tools and scripts import this module (never ``training``): ``run_main(main)`` runs an
entry point and reports a ``UserError`` (or a lost peer) as one ``error:`` line with exit status 1.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import mpu
from data_utils.coordination import set_preparation_group
from errors import ArgumentError, Interrupted, UserError, write_error

DATA_PREP_TIMEOUT_MIN = 120.0  # how long ranks wait for the one that builds a token cache, at least


def print_rank_0(message: str) -> None:
    """Print on global rank 0 only (or in a process without a group)."""
    if mpu.is_rank_0():
        print(message, flush=True)


def initialize_distributed(device: str, backend: str, model_parallel_size: int, local_rank: int = 0,
                           timeout_minutes: float = 10.0, pipeline_model_parallel_size: int = 1) -> torch.device:
    """Join the launcher's process group (or a group of one) and build the model-parallel groups.

    ``device`` is ``cpu`` or ``cuda`` (``cuda`` takes the GPU ``local_rank`` modulo the count); a
    plain ``python script.py`` without ``WORLD_SIZE`` in the environment forms a group of one with no
    port. With more than one rank, a second gloo group with a timeout of at least
    ``DATA_PREP_TIMEOUT_MIN`` minutes is where ranks wait while one of them prepares data.
    """
    if device == "cuda":
        where = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        if dist.get_world_size() > 1:  # waiting for one rank to tokenize a corpus may take far longer
            minutes = max(DATA_PREP_TIMEOUT_MIN, timeout_minutes)
            set_preparation_group(dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes)))
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(model_parallel_size, pipeline_model_parallel_size)
    return where


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and the model-parallel streams."""
    random.seed(seed)
    np.random.seed(seed)
    mpu.model_parallel_cuda_manual_seed(seed)


def all_ranks_agree(check: Callable[[], Any]) -> Any:
    """Run ``check`` on every rank; a user mistake on any rank stops all of them together.

    Without this a rank that fails alone (a node that cannot see ``--save``) exits while the others
    wait for it in their first collective. Every rank raises the first failing rank's error (prefixed
    ``rank R:`` unless every rank failed alike), marked ``every_rank`` so that only rank 0 prints it.
    """
    error: UserError | None = None
    result = None
    try:
        result = check()
    except UserError as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            everywhere = len(failed) == len(messages) and all(m == message for _, m in failed)
            kind = type(error) if error is not None and everywhere else ArgumentError
            raise kind(message if everywhere else f"rank {rank}: {message}", every_rank=True) from None
    if error is not None:
        raise error
    return result


_LOST_CONTACT = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")


def lost_contact(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died or hung (not a bug of this rank)."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(err, backend_error):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _LOST_CONTACT)


INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def leave_ctrl_c_to_the_parent() -> None:
    """In a worker process of a tool's pool: ignore SIGINT. A terminal's Ctrl-C reaches every process of its
    group; the parent stops the pool and reports one line, instead of each worker printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_cli(main: Callable[[], Any], describe_os_error: Callable[[OSError], str] | None = None) -> int:
    """Run ``main()`` and return the exit status: 0; or 1 after one ``error:`` line on stderr for a user
    mistake, a lost peer rank, or a failed write (read-only, full disk, no permission: ``errors.write_error``,
    unless ``describe_os_error`` words it); or 130 after one ``interrupted:`` line for Ctrl-C."""
    try:
        main()
    except Interrupted as err:
        if mpu.is_rank_0():
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except KeyboardInterrupt:
        if mpu.is_rank_0():
            print("interrupted: stopped by Ctrl-C; no output was left half written", file=sys.stderr, flush=True)
        return INTERRUPTED
    except UserError as err:
        # An error every rank raised together is printed once, by rank 0.
        if not (err.every_rank and not mpu.is_rank_0()):
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:
        failure = write_error(err)
        if describe_os_error is None and failure is None:
            raise
        print(f"error: {describe_os_error(err) if describe_os_error else failure}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:
        if not lost_contact(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        detail = str(err).splitlines()[0].split("] ", 1)[-1][:160]
        print(f"error: rank {rank} lost contact with another rank of the job ({detail}); a rank died or stopped "
              "answering within --distributed-timeout-minutes: see that rank's log", file=sys.stderr, flush=True)
        return 1
    return 0


def run_main(main: Callable[[], Any], describe_os_error: Callable[[OSError], str] | None = None) -> None:
    """Run an entry point as a process: ``run_cli``, then the process groups torn down whatever happened,
    and its exit status (1 after a reported error, 130 after Ctrl-C)."""
    try:
        status = run_cli(main, describe_os_error)
    finally:
        set_preparation_group(None)
        if dist.is_initialized():
            mpu.destroy_model_parallel()
            dist.destroy_process_group()
    if status:
        sys.exit(status)
