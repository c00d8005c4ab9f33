"""Tokens/s of the real training loop at data-parallel 1 and 2 and model-parallel 2, same global batch.

Each layout is a ``pretrain_gpt2.py`` run under torchrun (``python -m torch.distributed.run
--standalone``): ``single`` (1 process, batch B), ``dp2`` (2 processes, batch B/2 each, local DDP's
all-reduce) and ``mp2`` (2 processes, ``--model-parallel-size 2``, batch B), on a loose-json corpus
generated here and the byte-level ``CharacterLevelTokenizer`` (no download; vocabulary 260, padded to
384). Every layout gets all the machine's cores: ``OMP_NUM_THREADS`` is cores / processes (the
``--threads`` flag overrides it). A layout's tokens/s is the global tokens per iteration over the
median of the differences of consecutive ``elapsed_s`` in rank 0's ``metrics.jsonl``, skipping each
run's first ``--warmup`` iterations; with ``--rounds`` above 1 the layouts take turns (in a rotating
order) and the median is over all rounds. Prints each layout's tokens/s and its ratio to ``single``.

On a machine with C cores, two processes share the same C cores that one process had, so dp2 cannot
be much faster than single here (and gloo's all-reduce and mp2's per-layer all-reduces cost extra);
the point is to see what the parallel layouts cost, not to find a speed-up. On a machine that other
jobs keep busy (the load average is printed), a process whose threads use every core suffers most
(they wait for each other), so single then looks far slower than it is: compare with ``--threads 1``.

    python bench/scaling.py
    python bench/scaling.py --rounds 3 --iters 30
    python bench/scaling.py --device cuda --num-layers 12 --hidden-size 768 --heads 12 --seq-length 1024 \\
        --global-batch 16   # needs 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.loop_overhead import write_corpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"single": (1, 1), "dp2": (2, 1), "mp2": (2, 2)}  # name: (processes, model-parallel size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8, help="samples per iteration over all ranks (even)")
    parser.add_argument("--iters", type=int, default=16, help="training iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per layout, taking turns")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers per rank")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process (default: "
                                                                    "cores / processes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layouts", default=list(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}",
                        type=lambda text: [name.strip() for name in text.split(",") if name.strip()])
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    args = parser.parse_args()
    unknown = [name for name in args.layouts if name not in LAYOUTS]
    if unknown or "single" not in args.layouts:
        parser.error(f"--layouts: {', '.join(unknown) or 'single is needed'} (choose from {', '.join(LAYOUTS)}; "
                     "single is the reference)")
    if args.global_batch % 2:
        parser.error("--global-batch must be even (dp2 splits it)")
    if not 0 <= args.warmup < args.iters - 1:
        parser.error("--warmup must leave at least two iterations of --iters")
    return args


def run_layout(args, name: str, folder: str, corpus: str, run: int) -> tuple[list[float], float]:
    """One torchrun of ``pretrain_gpt2.py`` in layout ``name``: its steady per-iteration seconds and wall time."""
    processes, mp = LAYOUTS[name]
    log_dir = os.path.join(folder, f"{name}.{run}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    flags = {
        "--num-layers": args.num_layers, "--hidden-size": args.hidden_size, "--num-attention-heads": args.heads,
        "--seq-length": args.seq_length, "--max-position-embeddings": args.seq_length,
        "--batch-size": args.global_batch // (processes // mp), "--model-parallel-size": mp,
        "--train-iters": args.iters, "--lr": 1e-4, "--seed": 1234, "--tokenizer-type": "CharacterLevelTokenizer",
        "--train-data": corpus, "--split": "1,0,0", "--cache-dir": os.path.join(folder, "cache"),
        "--num-workers": args.num_workers, "--log-interval": 1, "--log-dir": log_dir, "--eval-iters": 0,
        "--device": args.device,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               os.path.join(REPO, "pretrain_gpt2.py")]
    for flag, value in flags.items():
        command += [flag, str(value)]
    # TMPDIR: torchrun's torchelastic_* folders go with ours.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO, TMPDIR=folder)
    start = time.monotonic()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"the {name} run failed (exit status {result.returncode})")
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["split"] == "train"]
    elapsed = {r["iteration"]: r["elapsed_s"] for r in records}
    steady = [it for it in sorted(elapsed) if it > args.warmup and it - 1 in elapsed]
    return [elapsed[it] - elapsed[it - 1] for it in steady], wall


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()[0]
    tokens_per_iter = args.global_batch * args.seq_length
    seconds: dict[str, list[float]] = {name: [] for name in args.layouts}
    walls: dict[str, list[float]] = {name: [] for name in args.layouts}
    with tempfile.TemporaryDirectory(prefix="scaling.") as folder:
        corpus = write_corpus(os.path.join(folder, "corpus.json"))
        for run in range(args.rounds):
            shift = run % len(args.layouts)
            for name in args.layouts[shift:] + args.layouts[:shift]:
                per_iter, wall = run_layout(args, name, folder, corpus, run)
                seconds[name] += per_iter
                walls[name].append(wall)
                print(f"round {run + 1}/{args.rounds} {name:>6}: {tokens_per_iter / statistics.median(per_iter):8.0f} "
                      f"tokens/s ({1000 * statistics.median(per_iter):.1f} ms/iter; run {wall:.1f} s with start-up)",
                      flush=True)
    cores = os.cpu_count()
    print(f"device {args.device}, {cores} cores, {args.num_layers} layers x {args.hidden_size}, {args.heads} heads, "
          f"global batch {args.global_batch} x {args.seq_length} = {tokens_per_iter} tokens/iteration, "
          f"{args.rounds} round(s) x {args.iters} iterations (first {args.warmup} of each left out); load average "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name in args.layouts:
        processes, mp = LAYOUTS[name]
        threads = args.threads or max(1, (cores or 1) // processes)
        print(f"{name:>6} ({processes} process(es), model-parallel {mp}, batch {args.global_batch // (processes // mp)}"
              f" per rank, {threads} thread(s) each): median {1000 * medians[name]:8.1f} ms/iter | "
              f"{tokens_per_iter / medians[name]:8.0f} tokens/s | ratio to single "
              f"{medians['single'] / medians[name]:.3f}")


if __name__ == "__main__":
    main()
