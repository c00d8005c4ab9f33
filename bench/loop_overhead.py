"""Time the whole training loop against the bare model step it wraps: what does the loop cost?

The loop is ``training.pretrain`` as ``pretrain_gpt2.py`` runs it: its data path (a loose-json corpus
generated here, tokenized by the byte-level ``CharacterLevelTokenizer``, no download), the
``FP16_Optimizer`` and local-DDP wrappers, gradient clipping, the lr schedule, the stop check and a
log line plus a ``metrics.jsonl`` record every iteration. The tokenizer reports ``--vocab-size``
(default GPT-2's 50257, padded to 50304 like a real run) so that the embedding and output layer cost
what they cost with the GPT-2 vocabulary. The bare step is forward + backward + AdamW
(``bench/harness.py``'s ``timed_step``, as ``bench/gpt2_train_step.py`` times it) on a model built by
the same ``pretrain_gpt2.model_provider`` with the same flags and padded vocabulary, and by default
the loop's own AdamW (``training.get_optimizer``: the fused kernel, weight decay on the matrices
only), so that the difference is the loop and not the optimizer's implementation;
``--bare-optimizer plain`` takes ``torch.optim.AdamW(params, lr)`` (on CPU its per-tensor loop is
far slower than the fused kernel, which hides the loop's cost).

Rounds alternate between the two (loop first, then bare first, ...) so that a noisy machine slows
both alike. The loop's ms/iteration is the median of the differences of consecutive ``elapsed_s`` in
its ``metrics.jsonl`` (everything, logging included), skipping each round's first ``--warmup``
iterations; the bare step's is the median of its timed steps. Prints both, and overhead =
loop / bare - 1 (the goal is at most 5%), the median of the rounds' own ratios and the ratio of the
fastest iterations (both less sensitive to a busy machine). ``--log-timers`` adds the loop's per-phase
medians, ``--step-pairs N`` the loop's ``train_step`` against the bare step alternating step by step,
and ``--profile`` a cProfile of one more loop round (where the Python time goes). On a machine that
other jobs keep busy (the load average is printed), steps that use every core swing by seconds and
so do these medians; ``--threads 1`` is steadier there.

    python bench/loop_overhead.py
    python bench/loop_overhead.py --log-timers --step-pairs 10 --profile
    python bench/loop_overhead.py --device cuda --dtype bf16 --num-layers 24 --hidden-size 1024 --heads 16 \\
        --seq-length 1024 --batch-size 8 --iters 30
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrain_gpt2  # noqa: E402
from arguments import get_args  # noqa: E402
from bench.gpt2_train_step import step_ours  # noqa: E402
from bench.harness import DTYPES, init_single_process, timed_step  # noqa: E402
from metrics import reduce_metrics  # noqa: E402
from restore import TrainState, decide_model_config  # noqa: E402
from training import build_data_iterators, get_optimizer, pretrain, setup_model_and_optimizer, train_step  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her all she there would their we him been has when who will more no if out so said").split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=50257, help="unpadded; padded as pretrain pads it")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout of both")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of loop and bare steps")
    parser.add_argument("--iters", type=int, default=4, help="loop iterations (and bare steps) per round")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out at the start of each round")
    parser.add_argument("--num-workers", type=int, default=2, help="the loop's data-loader workers (its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="loop: --bf16/--fp16 (half weights, fp32 masters); bare: autocast to this dtype")
    parser.add_argument("--bare-optimizer", default="loop", choices=["loop", "plain"],
                        help="loop: training.get_optimizer's AdamW; plain: torch.optim.AdamW(params, lr)")
    parser.add_argument("--log-timers", action="store_true", help="the loop with --log-timers: phase medians")
    parser.add_argument("--step-pairs", type=int, default=0,
                        help="then alternate this many pairs of the loop's train_step and the bare step, step by "
                             "step (finer interleaving than the rounds; no log line or stop check)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more loop round after the timing")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.iters - 1:
        parser.error("--warmup must leave at least two iterations of --iters")
    return args


def write_corpus(path: str, documents: int = 200, words: int = 250, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


class WideVocabulary:
    """The byte-level tokenizer, reporting a larger vocabulary (ids past 259 are simply never produced)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        if vocab_size < tokenizer.vocab_size:
            raise SystemExit(f"--vocab-size must be at least {tokenizer.vocab_size}")
        self._tokenizer, self.vocab_size = tokenizer, vocab_size

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def loop_argv(args, folder: str, corpus: str, iters: int, log_dir: str) -> list[str]:
    argv = [
        "--num-layers", args.num_layers, "--hidden-size", args.hidden_size, "--num-attention-heads", args.heads,
        "--seq-length", args.seq_length, "--max-position-embeddings", args.seq_length,
        "--batch-size", args.batch_size, "--train-iters", iters, "--lr", 1e-4, "--seed", 1234,
        "--hidden-dropout", args.dropout, "--attention-dropout", args.dropout,
        "--tokenizer-type", "CharacterLevelTokenizer", "--train-data", corpus, "--split", "1,0,0",
        "--cache-dir", os.path.join(folder, "cache"), "--num-workers", args.num_workers,
        "--log-interval", 1, "--log-dir", log_dir, "--eval-iters", 0, "--device", args.device,
    ]
    if args.dtype != "fp32":
        argv.append(f"--{args.dtype}")
    if args.log_timers:
        argv.append("--log-timers")
    return [str(a) for a in argv]


def run_loop(args, folder: str, corpus: str, name: str, console) -> list[dict]:
    """One ``pretrain`` call of ``--iters`` iterations; its train records from ``metrics.jsonl``."""
    log_dir = os.path.join(folder, name)

    def data_provider(run_args):
        tokenizer, *datasets = pretrain_gpt2.data_provider(run_args)
        return (WideVocabulary(tokenizer, args.vocab_size), *datasets)

    run_args = get_args(loop_argv(args, folder, corpus, args.iters, log_dir))
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        pretrain(run_args, pretrain_gpt2.model_provider, data_provider, pretrain_gpt2.forward_step_provider)
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def build_bare(args, folder: str, corpus: str, device: torch.device):
    """The same model as the loop's (same provider, flags and padded vocabulary), its AdamW and a batch."""
    run_args = get_args(loop_argv(args, folder, corpus, args.iters, os.path.join(folder, "unused")))
    config = decide_model_config(run_args, args.vocab_size)
    padded = config.vocab_size
    model = pretrain_gpt2.model_provider(config).to(device)
    model.train()
    if args.bare_optimizer == "loop":
        optimizer = get_optimizer(model, run_args)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=run_args.lr)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length + 1), device=device)
    positions = torch.arange(args.seq_length, device=device).expand(args.batch_size, -1)
    return model, optimizer, (tokens[:, :-1], tokens[:, 1:], positions), padded


def step_pairs(args, folder: str, corpus: str, bare, device: torch.device, console) -> tuple[list[float], list[float]]:
    """``--step-pairs``: the loop's ``train_step`` (its data loader, wrappers, clipping and schedule, plus the
    metric reduction) and the bare step, alternating step by step in this process: ms of each."""
    model, optimizer, batch = bare
    run_args = get_args(loop_argv(args, folder, corpus, 10**6, os.path.join(folder, "pairs")))
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        tokenizer, *datasets = pretrain_gpt2.data_provider(run_args)
        loop_model, loop_optimizer, scheduler = setup_model_and_optimizer(
            run_args, pretrain_gpt2.model_provider, decide_model_config(run_args, args.vocab_size), device)
        forward_step = pretrain_gpt2.forward_step_provider(run_args, tokenizer, device)
        train_iter = build_data_iterators(run_args, datasets, TrainState())[0]

    def loop_step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics, _, _ = train_step(forward_step, train_iter, loop_model, loop_optimizer, scheduler, run_args)
        reduce_metrics(metrics)  # a .cpu(): synchronises
        return time.perf_counter() - start

    loop_ms, bare_ms = [], []
    for pair in range(args.step_pairs + args.warmup):
        for kind in ("loop", "bare") if pair % 2 == 0 else ("bare", "loop"):
            seconds = loop_step() if kind == "loop" else timed_step(model, optimizer, step_ours, batch, device,
                                                                    DTYPES[args.dtype])
            if pair >= args.warmup:
                (loop_ms if kind == "loop" else bare_ms).append(1000 * seconds)
    return loop_ms, bare_ms


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()[0]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_process()  # pretrain() joins this group of one and its model-parallel groups
    loop_ms: list[float] = []
    logged_ms: list[float] = []
    bare_ms: list[float] = []
    round_ratios: list[float] = []
    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="loop_overhead.") as folder:
        corpus = write_corpus(os.path.join(folder, "corpus.json"))
        console = open(os.path.join(folder, "console.log"), "w")  # the loop's log lines, as a run would write them
        model, optimizer, batch, padded = build_bare(args, folder, corpus, device)
        dtype = DTYPES[args.dtype]
        tokens_per_iter = args.batch_size * args.seq_length
        for round_ in range(args.rounds):
            this_round: dict[str, list[float]] = {}
            for kind in ("loop", "bare") if round_ % 2 == 0 else ("bare", "loop"):
                if kind == "bare":
                    times = [timed_step(model, optimizer, step_ours, batch, device, dtype) for _ in range(args.iters)]
                    this_round["bare"] = [1000 * t for t in times[args.warmup:]]
                    continue
                records = run_loop(args, folder, corpus, f"round{round_}", console)
                steady = [r for r in records if r["iteration"] > args.warmup]
                elapsed = {r["iteration"]: r["elapsed_s"] for r in records}
                this_round["loop"] = [1000 * (elapsed[r["iteration"]] - elapsed[r["iteration"] - 1]) for r in steady]
                logged_ms += [1000 * tokens_per_iter / r["tokens_per_s"] for r in steady]
                for r in steady:
                    for key, value in r.items():
                        if key.startswith("time_") and key.endswith("_ms"):
                            phases.setdefault(key[5:-3], []).append(value)
            loop_ms += this_round["loop"]
            bare_ms += this_round["bare"]
            round_ratios.append(statistics.median(this_round["loop"]) / statistics.median(this_round["bare"]))
            print(f"round {round_ + 1}/{args.rounds}: loop {statistics.median(this_round['loop']):.1f} ms/iter, "
                  f"bare {statistics.median(this_round['bare']):.1f} ms/step, ratio {round_ratios[-1]:.3f}", flush=True)
        pairs = None
        if args.step_pairs:
            pairs = step_pairs(args, folder, corpus, (model, optimizer, batch), device, console)
        profile_text = profile_round(args, folder, corpus, console) if args.profile else ""
        console.close()

    params = sum(p.numel() for p in model.parameters())
    loop, logged, bare = (statistics.median(x) for x in (loop_ms, logged_ms, bare_ms))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype "
          f"{args.dtype}, {torch.get_num_threads()} threads, {params / 1e6:.1f}M parameters (vocabulary "
          f"{args.vocab_size} padded to {padded}), {args.num_layers} layers x {args.hidden_size}, {args.heads} heads, "
          f"batch {args.batch_size} x {args.seq_length}, dropout {args.dropout:g}, {args.num_workers} data workers, "
          f"{args.rounds} rounds x {args.iters} (first {args.warmup} of each left out): {len(loop_ms)} loop "
          f"iterations, {len(bare_ms)} bare steps; load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"      loop: median {loop:8.1f} ms/iter  | {tokens_per_iter / loop * 1000:8.0f} tokens/s "
          f"(min {min(loop_ms):.1f}, max {max(loop_ms):.1f}; logging and stop check included)")
    print(f"  loop w/o log line: {logged:8.1f} ms/iter   (from its tokens_per_s: train_step and metric "
          "reduction, not the log call)")
    print(f"      bare: median {bare:8.1f} ms/step  | {tokens_per_iter / bare * 1000:8.0f} tokens/s "
          f"(min {min(bare_ms):.1f}, max {max(bare_ms):.1f})")
    if phases:
        print("loop phases (--log-timers, median ms/iter): "
              + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in phases.items())
              + f"; sum {sum(statistics.median(v) for v in phases.values()):.1f}")
    if pairs:
        pair_loop, pair_bare = statistics.median(pairs[0]), statistics.median(pairs[1])
        print(f"step pairs ({len(pairs[0])}, alternating step by step): loop train_step median {pair_loop:.1f} ms, "
              f"bare {pair_bare:.1f} ms, ratio {pair_loop / pair_bare:.3f}")
    print(f"median of the per-round ratios: {statistics.median(round_ratios):.3f}; ratio of the fastest "
          f"iterations: {min(loop_ms) / min(bare_ms):.3f}")
    print(f"ratio loop/bare: {loop / bare:.3f}  overhead: {100 * (loop / bare - 1):+.1f}% (goal <= +5%)")
    if profile_text:
        print(profile_text)


def profile_round(args, folder: str, corpus: str, console) -> str:
    """cProfile of one more loop round: the functions with the most own time, and the loop's callees."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_loop(args, folder, corpus, "profiled", console)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    out.write(f"--- cProfile of one loop round ({args.iters} iterations, set-up included): top own time ---\n")
    stats.sort_stats("tottime").print_stats(20)
    out.write("--- cumulative time, training.py / fp16 / mpu / model / data_utils frames ---\n")
    stats.sort_stats("cumulative").print_stats(r"training|fp16|grads|gpt2|transformer|samplers|datasets|layers", 30)
    return out.getvalue()


if __name__ == "__main__":
    main()
