"""The user mistakes this toolkit reports as one line, and nothing else.

Every kind derives from ``UserError``; ``initialize.run_main`` catches the base, prints ``error:
<message>`` once and exits with status 1. A message names the file, line, key or flag at fault and
says what to do. ``every_rank`` marks an error that all ranks of a job raised together (agreed by
``initialize.all_ranks_agree``, or raised at the same iteration by construction): only rank 0
prints it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave (flags, files, checkpoints), reported as one line."""

    every_rank_by_default = False

    def __init__(self, message: str, *, every_rank: bool | None = None) -> None:
        super().__init__(message)
        self.every_rank = self.every_rank_by_default if every_rank is None else every_rank


class ArgumentError(UserError, ValueError):
    """A command-line mistake; the message names the flag and the remedy."""


class DataError(UserError, ValueError):
    """Bad data input: a missing file, a malformed line, an unknown alias or tokenizer."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used here; the message names the file and the mismatch."""


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the file or value and what to do."""


class NonFiniteError(UserError, RuntimeError):
    """Training met a non-finite loss or gradient norm it was told not to skip, or skipped too many
    steps. Every rank sees the same skipped steps, so every rank raises it at the same iteration."""

    every_rank_by_default = True
