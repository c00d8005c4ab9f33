"""What the train-step benchmarks share: a group of one, alternating timed steps, medians and ratios."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import mpu
from performance import measure_matmul_tflops
from training import compile_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LossFn = Callable[..., torch.Tensor]


def add_common_args(parser: argparse.ArgumentParser, layers: int, hidden: int, heads: int, vocab: int,
                    seq: int, batch: int) -> None:
    parser.add_argument("--num-layers", type=int, default=layers)
    parser.add_argument("--hidden-size", type=int, default=hidden)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--vocab-size", type=int, default=vocab)
    parser.add_argument("--seq-length", type=int, default=seq)
    parser.add_argument("--batch-size", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="autocast dtype for both models (fp32: none)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak, for MFU (default on CPU: a GEMM measured in the same run)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile this toolkit's transformer layers, as pretrain_*.py --compile does")
    parser.add_argument("--compile-peer", action="store_true", help="torch.compile the transformers model too")


def init_single_process(seed: int = 1234) -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(seed)


def timed_step(model, optimizer, loss_fn: LossFn, batch, device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(model, *batch)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(args, models: dict[str, torch.nn.Module], loss_fns: dict[str, LossFn], batch) -> None:
    """Alternate steps of ``models['ours']`` and ``models['transformers']``; print medians, MFU and the ratio.

    Model FLOPs per token: 6 N for the weights plus 12 L s h for the attention scores (forward + backward).
    """
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if getattr(args, "compile", False):
        compile_layers(models["ours"])
    if getattr(args, "compile_peer", False):
        models["transformers"].compile()
    peak, peak_source = args.peak_tflops, "--peak-tflops"
    gemm_rates: list[float] = []
    if peak is None and device.type == "cpu":
        gemm_rates.append(measure_matmul_tflops(dtype))
        peak_source = "a GEMM measured in this run"
    # Both use the fused AdamW kernel: this toolkit's optimizer, and transformers' Trainer default (torch >= 2.8).
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 2):
        for name in models:
            elapsed = timed_step(models[name], optimizers[name], loss_fns[name], batch, device, dtype)
            if step >= 2:
                times[name].append(elapsed)
    if gemm_rates:
        gemm_rates.append(measure_matmul_tflops(dtype))
        peak = max(gemm_rates)
    params = sum(p.numel() for p in models["ours"].parameters())
    tokens_per_step = args.batch_size * args.seq_length
    flops_per_step = tokens_per_step * (6 * params + 12 * args.num_layers * args.seq_length * args.hidden_size)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype "
          f"{args.dtype}, {params / 1e6:.1f}M parameters, {tokens_per_step} tokens/step, {args.steps} steps")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        line = f"{name:>13}: median step {1000 * median:8.1f} ms | {tokens_per_step / median:9.0f} tokens/s"
        if peak:
            rate = flops_per_step / median / 1e12
            line += f" | {rate:.3f} TFLOP/s | MFU {100 * rate / peak:.1f}% of {peak:.3f} TFLOP/s ({peak_source})"
        print(line)
    print(f"ratio ours/transformers step time: {medians['ours'] / medians['transformers']:.3f}")
    mpu.destroy_model_parallel()
    dist.destroy_process_group()
