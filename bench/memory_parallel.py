"""Memory per rank that the scale features remove: optimizer state under ``--use-distributed-optimizer``
at data-parallel 1, 2 and 4 against the replicated optimizer, and peak activation memory at
model-parallel 2 with and without ``--sequence-parallel``; each measured on CPU beside the ratio
expected from the arithmetic.

Optimizer state: each layout is a real ``pretrain_gpt2.py`` run under torchrun (``--bf16``, so that the
fp32 master weights are separate from the weights, as on a GPU cluster; two iterations) on a generated
corpus with the byte-level tokenizer; the bytes come from the line the run prints after its first
iteration (``this rank holds ... optimizer state``: fp32 masters and Adam's moments, counted from the
tensors the optimizer holds). Expected: the replicated state over the data-parallel size.

Activations: a GPT2 model built at model-parallel 2 in two gloo processes runs one forward and backward
on a random batch; the bytes autograd keeps for backward are counted at their peak
(``performance.SavedActivationMeter``). Expected, from Korthikanti et al. 2022's per-layer formulas
(``s b h (10 + 24 / t + 5 a s / (h t))`` bytes without sequence parallelism, ``s b h (34 + 5 a s / h) / t``
with it, in half precision; here fp32 doubles both), their ratio. The weights a layer saves for its
backward are left out; the embedding and the output layer, which the formula leaves out, are in, so the
measured ratio only comes near the formula's.

    python bench/memory_parallel.py
    python bench/memory_parallel.py --hidden-size 512 --num-layers 4 --seq-length 256
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpu  # noqa: E402
from bench.loop_overhead import write_corpus  # noqa: E402
from model import GPT2Model, TransformerConfig  # noqa: E402
from performance import SavedActivationMeter  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD = re.compile(r"optimizer state ([0-9.]+) MB")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--parts", default="optimizer,activations", help="which measurements, comma-separated")
    return parser.parse_args()


def optimizer_state_mb(args: argparse.Namespace, folder: str, corpus: str, dp: int, sharded: bool) -> float:
    """Rank 0's optimizer state in MB, from a two-iteration run at data-parallel ``dp``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(dp),
               "pretrain_gpt2.py", "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
               "--num-attention-heads", str(args.heads), "--seq-length", str(args.seq_length),
               "--max-position-embeddings", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
               "--train-iters", "2", "--eval-iters", "0", "--train-data", corpus, "--split", "1",
               "--tokenizer-type", "CharacterLevelTokenizer", "--cache-dir", os.path.join(folder, "cache"),
               "--num-workers", "0", "--device", "cpu", "--bf16", "--log-interval", "1"]
    if sharded:
        command.append("--use-distributed-optimizer")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    match = HELD.search(proc.stdout)
    if proc.returncode or not match:
        raise SystemExit(f"the run at data-parallel {dp} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return float(match.group(1))


def measure_optimizer(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        corpus = write_corpus(os.path.join(folder, "corpus.json"), 200)
        plain = optimizer_state_mb(args, folder, corpus, 1, sharded=False)
        print(f"optimizer state per rank ({args.num_layers} layers, hidden {args.hidden_size}, bf16, Adam):")
        print(f"  replicated, any data-parallel size: {plain:8.2f} MB   1.000x")
        for dp in (1, 2, 4):
            sharded = optimizer_state_mb(args, folder, corpus, dp, sharded=True)
            print(f"  --use-distributed-optimizer, dp {dp}:  {sharded:8.2f} MB   {sharded / plain:.3f}x "
                  f"(expected {1 / dp:.3f}x)", flush=True)


def measure_activations(args: argparse.Namespace) -> None:
    try:
        peaks = {sp: run_distributed(activation_peak, 2, vars(args), sp)[0] for sp in (False, True)}
    except Exception as err:  # noqa: BLE001 - a model without sequence parallelism says so
        print(f"activation memory: not measured ({str(err).splitlines()[-1]})")
        return
    s, b, h, a, t = args.seq_length, args.micro_batch_size, args.hidden_size, args.heads, 2
    plain = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    split = s * b * h * (34 + 5 * a * s / h) / t
    print(f"peak activation memory per rank at model-parallel 2 (autograd's saved tensors, fp32, "
          f"{args.num_layers} layers, batch {b} x {s}):")
    print(f"  without --sequence-parallel: {peaks[False] / 2**20:8.2f} MB")
    print(f"  with --sequence-parallel:    {peaks[True] / 2**20:8.2f} MB   {peaks[True] / peaks[False]:.3f}x "
          f"(the per-layer formula: {split / plain:.3f}x)")


def activation_peak(settings: dict, sequence_parallel: bool) -> int:
    """This rank's peak of saved activations in one forward and backward of GPT2 at model-parallel 2."""
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(2)
    mpu.model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(num_layers=settings["num_layers"], hidden_size=settings["hidden_size"],
                               num_attention_heads=settings["heads"], vocab_size=512,
                               max_sequence_length=settings["seq_length"], sequence_parallel=sequence_parallel)
    model = GPT2Model(config)
    tokens = torch.randint(0, 512, (settings["micro_batch_size"], settings["seq_length"]),
                           generator=torch.Generator().manual_seed(0))
    positions = torch.arange(settings["seq_length"]).expand_as(tokens)
    with SavedActivationMeter(model.parameters()) as meter:
        logits = model(tokens, positions)
        mpu.vocab_parallel_cross_entropy(logits, tokens).mean().backward()
    return meter.peak


def main() -> None:
    args = parse_args()
    parts = {part.strip() for part in args.parts.split(",")}
    if "optimizer" in parts:
        measure_optimizer(args)
    if "activations" in parts:
        measure_activations(args)


if __name__ == "__main__":
    main()
