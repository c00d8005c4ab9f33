"""Peak memory of one GPT2 training step with and without activation checkpointing.

Each variant runs in a fresh Python process (so that one's high-water mark cannot hide the other's):
it builds the model (``TransformerConfig(checkpoint_activations=...)``, GPT2-124M's shape by default)
and its AdamW, allocates the optimizer's moments with one step on zero gradients, then measures one
training step (forward, backward, AdamW; ``bench/harness.py``'s ``timed_step``) on a random batch.
The step's memory is what it adds on top of the model and optimizer: on CPU the process's peak
resident set (``resource.getrusage``) minus its resident set just before the step; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before it. The peak is reset just
before the step (``/proc/self/clear_refs`` on Linux, ``reset_peak_memory_stats`` on CUDA), since the
set-up's own transient (the zero gradients) would otherwise hide a small step's peak. Variants alternate
(plain, checkpointed, plain, ...) for ``--repeats`` processes each; prints the medians and the ratio
checkpointed / plain, plus each step's time (checkpointing recomputes the forward).

On CPU the default is 4 layers (a 12-layer process takes about 35 s on an idle 2-core machine,
several times that on a busy one); ``--num-layers 12`` is the full GPT2-124M. The memory that
checkpointing saves grows with the layer count, so the ratio at 12 layers is lower than at 4. The
step time is that of a single first step in a fresh process (page faults included), for orientation
only.

    python bench/memory.py
    python bench/memory.py --num-layers 12 --batch-size 2 --repeats 1
    python bench/memory.py --device cuda --num-layers 12 --batch-size 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpt2_train_step import step_ours  # noqa: E402
from bench.harness import DTYPES, init_single_process, timed_step  # noqa: E402
from model import (  # noqa: E402
    GPT2Model,
    TransformerConfig,
    pad_vocab_size,  # noqa: E402
)

VARIANTS = ("plain", "checkpointed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=None,
                        help="default: 12 (GPT2-124M) on CUDA, 4 on CPU to stay within a few minutes")
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257, help="unpadded; padded to a multiple of 128")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, choices=[1, 2])
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (the flags' default)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant, alternating")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layers = args.num_layers or (12 if args.device == "cuda" else 4)
    return argparse.Namespace(**{**vars(args), "num_layers": layers})


def current_rss_mb() -> float:
    """The resident set now (Linux /proc); elsewhere the peak so far, which only overstates the baseline."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak_rss() -> bool:
    """Lower the peak resident set to the current one (Linux: ``/proc/self/clear_refs``), so that the set-up's
    transient memory cannot stand in for the step's peak; whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def child(args) -> dict:
    """One variant in this (fresh) process: the step's peak memory above the model and optimizer, in MB."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    init_single_process()
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
        vocab_size=pad_vocab_size(args.vocab_size, 128, 1), unpadded_vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length, hidden_dropout=args.dropout, attention_dropout=args.dropout,
        checkpoint_activations=args.child == "checkpointed", scaled_init=True,
    )
    model = GPT2Model(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)  # no foreach scratch copies
    for param in model.parameters():  # allocate the moments now: they are the optimizer's, not the step's
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length + 1), device=device)
    positions = torch.arange(args.seq_length, device=device).expand(args.batch_size, -1)
    batch = (tokens[:, :-1], tokens[:, 1:], positions)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset = reset_peak_rss()
        base = current_rss_mb()
    seconds = timed_step(model, optimizer, step_ours, batch, device, dtype)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mb()
    params = sum(p.numel() for p in model.parameters())
    return {"variant": args.child, "base_mb": base, "peak_mb": peak, "step_mb": peak - base, "seconds": seconds,
            "params": params, "reset": device.type == "cuda" or reset}


def run_child(variant: str, argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", variant],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"the {variant} process failed (exit status {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = sys.argv[1:]
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            run = run_child(variant, argv)
            runs[variant].append(run)
            print(f"{variant:>12}: step {run['step_mb']:8.1f} MB above {run['base_mb']:7.1f} MB "
                  f"(peak {run['peak_mb']:.1f} MB), {run['seconds']:.1f} s", flush=True)
    what = ("max_memory_allocated minus allocated before the step" if args.device == "cuda"
            else "peak RSS (getrusage) minus RSS before the step")
    if not all(r["reset"] for v in VARIANTS for r in runs[v]):
        what += " (the peak could not be reset before the step: it may be the set-up's)"
    params = runs["plain"][0]["params"]
    full = " (GPT2-124M has 12; --num-layers 12 for it)" if args.num_layers != 12 else ""
    print(f"device {args.device}, dtype {args.dtype}, {params / 1e6:.1f}M parameters, {args.num_layers} layers"
          f"{full} x {args.hidden_size}, {args.heads} heads, batch {args.batch_size} x {args.seq_length}, "
          f"dropout {args.dropout:g}, {args.repeats} process(es) per variant; memory = {what}; load average "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    medians = {v: statistics.median(r["step_mb"] for r in runs[v]) for v in VARIANTS}
    times = {v: statistics.median(r["seconds"] for r in runs[v]) for v in VARIANTS}
    for variant in VARIANTS:
        print(f"{variant:>12}: median step memory {medians[variant]:8.1f} MB | median step {times[variant]:6.2f} s")
    grads_mb = params * 4 / 2**20
    print(f"(both include the {grads_mb:.0f} MB of fp32 gradients the step allocates; without them: "
          f"ratio {(medians['checkpointed'] - grads_mb) / (medians['plain'] - grads_mb):.3f})")
    print(f"ratio checkpointed/plain: memory {medians['checkpointed'] / medians['plain']:.3f}, "
          f"step time {times['checkpointed'] / times['plain']:.3f}")


if __name__ == "__main__":
    main()
