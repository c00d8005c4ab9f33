"""The data path's user mistakes (``errors.DataError``) and its one-per-job warnings."""

from __future__ import annotations

import sys

import mpu
from errors import DataError

__all__ = ["DataError", "warn"]


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr, once per job (global rank 0, or the only process)."""
    if mpu.is_rank_0():
        print(f"warning: {message}", file=sys.stderr, flush=True)
