"""What a run reports: console lines in Megatron's style, ``metrics.jsonl`` (and TensorBoard), the
metrics averaged over data-parallel ranks, and the run's last line.

Every log interval appends one JSON object per line to ``LOG_DIR/metrics.jsonl`` (rank 0 only):
``iteration``, ``split``, the model's losses, ``lr``, ``loss_scale``, ``grad_norm``, ``skipped_iters``,
``tokens_per_s``, ``elapsed_s`` (and with ``Performance`` the TFLOP/s, MFU, phase timings and memory);
evaluation records carry the averaged losses and ``ppl``. A non-finite number is written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import mpu
from initialize import print_rank_0
from performance import Performance, peak_memory_mb


class MetricsLogger:
    """Console lines in Megatron's style, ``metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, log_dir: str | None) -> None:
        self.enabled = mpu.is_rank_0()
        self.path = None
        self.writer = None
        if log_dir and self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, "metrics.jsonl")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=log_dir)
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (``iteration``, ``split`` and numbers) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        if self.path:
            # JSON has no NaN or Infinity: a non-finite number (a diverged loss) is written as null.
            plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(plain, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration",):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["iteration"])
            self.writer.flush()


def reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar metrics over the data-parallel group (one collective for all of them)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()).cpu() for k in keys])
    group = mpu.get_data_parallel_group()
    if mpu.get_data_parallel_world_size() > 1:
        values = values.to(mpu.collective_device(group))
        dist.all_reduce(values, group=group)
        values = values / mpu.get_data_parallel_world_size()
    return dict(zip(keys, values.tolist()))


class IntervalStats:
    """Accumulates training metrics between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.stepped = 0
        self.grad_norm = 0.0
        self.tokens = 0
        self.start = time.monotonic()

    def add(self, metrics: dict[str, float], grad_norm: float | None, tokens: int = 0) -> None:
        """Add one iteration of ``tokens`` (its global batch's); ``grad_norm`` is ``None`` for a skipped
        (overflowed) step."""
        self.tokens += tokens
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.stepped += 1
        self.count += 1


def log_training(logger: MetricsLogger, stats: IntervalStats, *, iteration: int, train_iters: int,
                 skipped_iters: int, lr: float, loss_scale: float, batch: dict[str, int], train_start: float,
                 perf: Performance | None = None) -> None:
    """One console line in Megatron's style and one ``train`` record for the interval in ``stats``;
    ``batch`` holds the last iteration's ``global_batch_size``, ``micro_batch_size`` and
    ``accumulation_steps``. Tokens/s (and with them TFLOP/s and MFU) count every global batch whole."""
    elapsed = time.monotonic() - stats.start
    n = max(1, stats.count)
    means = {k: v / n for k, v in stats.sums.items()}
    record = {
        "iteration": iteration, "split": "train", **means, "lr": lr,
        "loss_scale": loss_scale, "grad_norm": stats.grad_norm / max(1, stats.stepped),
        "skipped_iters": skipped_iters, **batch,
        "tokens_per_s": stats.tokens / max(elapsed, 1e-9), "elapsed_s": time.monotonic() - train_start,
    }
    extra = ""
    if perf is not None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        record["tflops_per_device"] = perf.flops_per_token * record["tokens_per_s"] / world / 1e12
        extra = f" TFLOP/s per device {record['tflops_per_device']:.3g} |"
        if perf.peak_tflops:
            record["mfu"] = record["tflops_per_device"] / perf.peak_tflops
            extra += f" MFU {100 * record['mfu']:.1f}% |"
        timings = perf.timers.milliseconds_per_iteration(stats.count)
        record.update(timings)
        if timings:
            extra += " ms/iter: " + ", ".join(f"{k[5:-3]} {v:.1f}" for k, v in timings.items()) + " |"
        record.update(peak_memory_mb(perf.device))
    losses = " | ".join(f"{k.replace('_', ' ')} {v:.6E}" for k, v in means.items())
    print_rank_0(
        f" iteration {iteration:8d}/{train_iters:8d} | elapsed time per iteration (ms): "
        f"{1000 * elapsed / n:.1f} | learning rate {record['lr']:.3E} | global batch size "
        f"{batch.get('global_batch_size', 0):5d} | {losses} | loss scale "
        f"{record['loss_scale']:.1f} | grad norm {record['grad_norm']:.3f} | skipped iterations "
        f"{skipped_iters} | tokens/s {record['tokens_per_s']:.0f} |{extra}"
    )
    logger.write(record)


def log_evaluation(logger: MetricsLogger, name: str, split: str, iteration: int,
                   results: dict[str, float]) -> dict[str, float]:
    """Add perplexity to averaged evaluation ``results`` (with ``lm_loss``), print them between rules
    and write one ``split`` record; returns the results with ``ppl``."""
    results = dict(results)
    if "lm_loss" in results:
        loss = results["lm_loss"]  # a diverged (nan/inf) loss has no perplexity, not a clamped large one
        results["ppl"] = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    text = " | ".join(f"{k.replace('_', ' ')} value: {v:.6E}" for k, v in results.items())
    print_rank_0("-" * 80 + f"\n {name} at iteration {iteration} | {text}\n" + "-" * 80)
    logger.write({"iteration": iteration, "split": split, **results})
    return results


def print_run_summary(results: dict[str, Any], describe_valid: Callable[[dict[str, float]], str]) -> None:
    """Rank 0's last line of a training run: iteration, validation (``describe_valid``), where outputs went."""
    summary = [f"trained to iteration {results['iteration']}" + (f" ({results['batches']})" if "batches" in results
                                                                 else "")]
    if results.get("stopped"):
        summary.append(f"stopped early ({results['stopped']})")
    if "valid" in results:
        diverged = [k for k, v in results["valid"].items() if not math.isfinite(v)]
        summary.append(f"the run diverged: validation {', '.join(diverged)} is not finite" if diverged
                       else describe_valid(results["valid"]))
    if results["save"]:
        summary.append(f"checkpoint in {results['save']}")
    if results["metrics"]:
        summary.append(f"metrics in {results['metrics']}")
    print_rank_0("done: " + " | ".join(summary))
