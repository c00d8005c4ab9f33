"""Preparation that one rank does for a group while the others wait (token caches, sample indices,
SentencePiece models), and the process group such waits happen in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from errors import DataError, UserError

_PREPARATION_GROUP: Any = None


def set_preparation_group(group: Any) -> None:
    """The process group to wait in while one rank builds a cache, when the caller names none: the
    whole job with a timeout long enough for tokenizing a large corpus (``training`` sets it)."""
    global _PREPARATION_GROUP
    _PREPARATION_GROUP = group


def once_per_group(ready: Callable[[], bool], build: Callable[[], None], group: Any = None,
                    what: str = "the cache") -> None:
    """Run ``build`` on the group's first rank while the others wait; then on any rank still not ready.

    Without torch.distributed (or in a group of one) it just builds when not ready. The second
    chance covers cache folders that are not shared between nodes. ``group`` None waits in the
    preparation group (``set_preparation_group``), else the default group.
    """
    if group is None:
        group = _PREPARATION_GROUP

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if not ready():
            build()
        return
    first = dist.get_global_rank(group, 0) if group is not None else 0
    failure: list[Any] = [None]
    if dist.get_rank() == first and not ready():
        try:
            build()
        except Exception as exc:
            failure = [(isinstance(exc, UserError), str(exc))]  # a user mistake, a full disk
            dist.broadcast_object_list(failure, src=first, group=group)
            raise
    dist.broadcast_object_list(failure, src=first, group=group)  # doubles as the barrier
    if failure[0] is not None:
        is_data_error, message = failure[0]
        raise (DataError if is_data_error else RuntimeError)(f"rank {first} failed to build {what}: {message}")
    if not ready():
        build()
