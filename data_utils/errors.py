"""The one exception the data path raises for user mistakes."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing file, a malformed line, an unknown alias or tokenizer.

    The message is a single line that names the file, line or key at fault and says what to do,
    so an entry script can print it and exit non-zero without a traceback.
    """


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr, once per job (global rank 0, or the only process)."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
