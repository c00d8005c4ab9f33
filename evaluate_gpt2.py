"""Zero-shot GPT2 evaluation of a checkpoint: WikiText perplexity, LAMBADA cloze accuracy, loose-json perplexity.

    python evaluate_gpt2.py --load CKPT --valid-data wiki.test.tokens [--cloze-eval | --webtext-eval] ...

The modes and their exact protocols are described in ``evaluation.py``; this script parses the flags,
runs the mode on every rank, prints one summary line and, with ``--results-file``, writes the results.
"""

from __future__ import annotations

import mpu
from arguments import get_args
from evaluation import evaluate, summary, write_results
from initialize import print_rank_0, run_main


def parse_args(argv: list[str] | None = None):
    """The shared flags; the window (--seq-length) defaults to the checkpoint's position count."""
    return get_args(argv, description="GPT2 zero-shot evaluation", defaults={"seq_length": None}, model="gpt2")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = evaluate(args)
    print_rank_0(summary(results))
    if args.results_file and mpu.is_rank_0():
        write_results(args.results_file, results)
        print_rank_0(f"results in {args.results_file}")


if __name__ == "__main__":
    run_main(main)
