"""Run evaluate_gpt2.py with the 2019 README's command lines (section "GPT2 Evaluation").

    python scripts/run_gpt2_eval.py --model-parallel-size 1 --num-layers 24 --hidden-size 1024 \\
        --num-attention-heads 16 --model-path <checkpoint dir> --data-path <wiki.test.tokens> \\
        --batch-size 16 --cache-dir cache [--cloze-eval [--strict-lambada] | --webtext-eval --eval-iters 5000]

builds the ``evaluate_gpt2.py`` command (``--load <model-path> --valid-data <data-path>
--eval-batch-size <batch-size> ...``), prints it and runs it: with this Python for
``--model-parallel-size 1``, under ``torchrun --nproc_per_node <size>`` otherwise. Its exit status is
this script's. The shape flags are optional (the checkpoint has its shape; given ones must agree),
and so is ``--seq-length``: the window defaults to the checkpoint's position count, 1024 for the
seed's 345M model. Flags this script does not know are passed through unchanged.

Precision: the 2019 script always added ``--fp16``. Here ``--fp16`` is added when the evaluation
runs on CUDA (``--device cuda``, or ``auto`` with a GPU present); on CPU fp16 is slow and buys
nothing, so it runs in fp32. ``--fp16``/``--no-fp16`` decide explicitly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(REPO, "evaluate_gpt2.py")

# (this script's flag, evaluate_gpt2.py's flag) for values passed on only when given.
PASSED_VALUES = (
    ("--num-layers", "--num-layers"), ("--hidden-size", "--hidden-size"),
    ("--num-attention-heads", "--num-attention-heads"), ("--seq-length", "--seq-length"),
    ("--overlapping-eval", "--overlapping-eval"), ("--eval-iters", "--eval-iters"),
    ("--results-file", "--results-file"), ("--tokenizer-type", "--tokenizer-type"),
    ("--vocab-file", "--vocab-file"), ("--merge-file", "--merge-file"), ("--text-key", "--eval-text-key"),
)
PASSED_SWITCHES = ("--cloze-eval", "--strict-lambada", "--webtext-eval", "--overwrite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model-parallel-size", type=int, default=1, help="processes (one per model partition)")
    parser.add_argument("--model-path", required=True, help="checkpoint directory (becomes --load)")
    parser.add_argument("--data-path", required=True, help="evaluation file (becomes --valid-data)")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (--eval-batch-size)")
    parser.add_argument("--cache-dir", default="cache", help="vocabulary files and token caches")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate in fp16 (default: on CUDA only)")
    for flag, _ in PASSED_VALUES:
        parser.add_argument(flag, default=None, help="passed to evaluate_gpt2.py when given")
    for flag in PASSED_SWITCHES:
        parser.add_argument(flag, action="store_true", help="passed to evaluate_gpt2.py")
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _use_fp16(args: argparse.Namespace) -> bool:
    if args.fp16 is not None:
        return args.fp16
    return args.device == "cuda" or (args.device == "auto" and _cuda_available())


def _launcher(model_parallel_size: int) -> list[str]:
    if model_parallel_size == 1:
        return [sys.executable]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nproc_per_node", str(model_parallel_size)]


def build_command(argv: list[str] | None = None) -> list[str]:
    """The full command (launcher, ``evaluate_gpt2.py`` and its flags) for this script's ``argv``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.model_parallel_size < 1:
        parser.error(f"--model-parallel-size must be at least 1, got {args.model_parallel_size}")
    flags = ["--model-parallel-size", str(args.model_parallel_size), "--load", args.model_path,
             "--valid-data", args.data_path, "--eval-batch-size", str(args.batch_size),
             "--cache-dir", args.cache_dir, "--device", args.device]
    for ours, theirs in PASSED_VALUES:
        value = getattr(args, ours[2:].replace("-", "_"))
        if value is not None:
            flags += [theirs, value]
    flags += [flag for flag in PASSED_SWITCHES if getattr(args, flag[2:].replace("-", "_"))]
    if _use_fp16(args):
        flags.append("--fp16")
    return [*_launcher(args.model_parallel_size), ENTRY, *flags, *extra]


def saved_model_parallel_size(model_path: str) -> int | None:
    """How many model-parallel ranks the latest checkpoint in ``model_path`` has; None when unknown."""
    tracker = os.path.join(model_path, "latest_checkpointed_iteration.txt")
    try:
        with open(tracker) as f:
            text = f.read().strip()
        folder = os.path.join(model_path, "release" if text == "release" else f"iter_{int(text):07d}")
        ranks = [d for d in os.listdir(folder) if d.startswith("mp_rank_")]
    except (OSError, ValueError):
        return None  # evaluate_gpt2.py explains what is wrong with it
    return len(ranks) or None


def main(argv: list[str] | None = None) -> int:
    command = build_command(argv)
    args, _ = build_parser().parse_known_args(argv)
    saved = saved_model_parallel_size(args.model_path)
    if args.model_parallel_size > 1 and saved not in (None, args.model_parallel_size):
        # Caught here because under torchrun the one-line error drowns in the launcher's own report.
        print(f"error: {args.model_path} was saved with model-parallel size {saved}; run with "
              f"--model-parallel-size {saved}", file=sys.stderr)
        return 1
    print("Running: " + shlex.join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
