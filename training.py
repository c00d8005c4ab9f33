"""The shared training loop: set-up, train, evaluate, checkpoint and log.

An entry script gives ``pretrain`` three things:

* ``model_provider(args, padded_vocab_size) -> nn.Module`` -- the bare model (on CPU);
* ``data_provider(args) -> (tokenizer, train, valid, test)`` -- datasets (``None`` when empty);
* ``forward_step(batch, model) -> (loss, metrics)`` -- ``batch`` is the loader's dict on the first
  rank of each model-parallel group and ``None`` elsewhere (share it with ``mpu.broadcast_data``);
  ``metrics`` maps names such as ``lm_loss`` to detached scalar tensors.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import mpu
from arguments import ArgumentError, pad_vocab_size, writable_directory
from checkpointing import (
    TRACKER_FILENAME,
    CheckpointError,
    check_config,
    checkpoint_root_of,
    get_checkpoint_tracker_filename,
    remove_old_checkpoints,
    remove_orphaned_temporaries,
    save_checkpoint,
    set_rng_state,
)
from conversion import read_load_state
from data_utils.lazy_loader import set_preparation_group
from fp16 import FP16_Module, FP16_Optimizer
from fp16.loss_scaler import DynamicLossScaler, LossScaler
from inference import adopt_stored_shape
from learning_rates import AnnealingLR
from model.distributed import DistributedDataParallel, unwrap_model, wrap_data_parallel
from performance import Timers, model_flops_per_token, peak_memory_mb, peak_tflops, precision_name

ForwardStep = Callable[[Any, nn.Module], tuple[torch.Tensor, dict[str, torch.Tensor]]]
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length",
              "intermediate_size", "num_tokentypes", "post_layernorm", "unpadded_vocab_size")


DATA_PREP_TIMEOUT_MIN = 120.0  # how long ranks wait for the one that builds a token cache, at least


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def initialize_distributed(args) -> torch.device:
    """Join the launcher's process group (or a group of one) and build the model-parallel groups."""
    if args.device == "cuda":
        device = torch.device("cuda", args.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(args.distributed_backend, init_method="env://", timeout=timeout)
        else:  # a plain `python pretrain_gpt2.py`: a group of one, no port needed
            dist.init_process_group(
                args.distributed_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        if dist.get_world_size() > 1:  # waiting for one rank to tokenize a corpus may take far longer
            minutes = max(DATA_PREP_TIMEOUT_MIN, args.distributed_timeout_minutes)
            set_preparation_group(dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes)))
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(args.model_parallel_size)
    return device


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and the model-parallel streams."""
    random.seed(seed)
    np.random.seed(seed)
    mpu.model_parallel_cuda_manual_seed(seed)


def optimizer_param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The named parameters with and without weight decay, in the order the optimizer numbers them
    (decay first); weight decay goes to weight matrices only, not to biases or LayerNorm.
    ``tools/reshard_checkpoint.py`` reads a saved optimizer state by this order."""
    decay, no_decay = [], []
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(module, nn.LayerNorm) or name == "bias":
                no_decay.append((full, param))
            else:
                decay.append((full, param))
    return decay, no_decay


def get_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases or LayerNorm)."""
    decay, no_decay = optimizer_param_groups(model)
    groups = [{"params": [p for _, p in decay], "weight_decay": args.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    # torch's fused AdamW kernel, on CUDA and on CPU alike (on CPU 6-8x faster than the foreach loop)
    return torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True,
    )


def get_learning_rate_scheduler(optimizer: torch.optim.Optimizer, args) -> AnnealingLR:
    return AnnealingLR(
        optimizer, start_lr=args.lr, warmup_iter=int(args.warmup * args.lr_decay_iters),
        num_iters=args.lr_decay_iters, decay_style=args.lr_decay_style, min_lr=args.min_lr,
    )


@dataclasses.dataclass
class TrainState:
    """Progress that a checkpoint carries forward."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(unwrap_model(model), "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def _plain_args(args) -> dict[str, Any]:
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))}


def save(args, state: TrainState, model: nn.Module, optimizer, scheduler: AnnealingLR) -> str:
    extra = {
        "config": _model_config(model),
        "data": {"consumed_samples": state.consumed_samples},
        "skipped_iters": state.skipped_iters,
        "args": _plain_args(args),
    }
    if not args.no_save_optim:  # as in Megatron, --no-save-optim leaves out the lr schedule too
        extra["lr_scheduler"] = scheduler.state_dict()
    path = save_checkpoint(
        args.save, state.iteration, unwrap_model(model).state_dict(), extra,
        optimizer_state=None if args.no_save_optim else optimizer.state_dict(),
        rng=not args.no_save_rng,
    )
    print_rank_0(f"saved checkpoint at iteration {state.iteration} to {args.save}")
    if args.keep_last_checkpoints and (not dist.is_initialized() or dist.get_rank() == 0):
        removed = remove_old_checkpoints(args.save, args.keep_last_checkpoints)
        if removed:
            print(f"removed {len(removed)} older checkpoint(s) (--keep-last-checkpoints "
                  f"{args.keep_last_checkpoints}): {', '.join(os.path.basename(p) for p in removed)}", flush=True)
    return path


def _load_schedule(args, saved: dict[str, Any] | None, scheduler: AnnealingLR, iteration: int) -> None:
    """Continue the lr schedule at ``iteration``. Its shape always comes from the flags (a user who
    changes them on resume means it); one line says when they differ from the checkpoint's, or when
    the checkpoint's state is not used (``--no-load-optim``, or saved with ``--no-save-optim``)."""
    if saved is None or args.no_load_optim:
        why = "--no-load-optim" if args.no_load_optim else "the checkpoint holds no lr-scheduler state"
        print_rank_0(f"note: {why}; the lr schedule follows the flags from iteration {iteration}")
        scheduler.load_state_dict({"num_iters": iteration})
        return
    current = scheduler.state_dict()
    shape = ("start_lr", "min_lr", "warmup_iter", "end_iter", "decay_style")
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in shape if key in saved and saved[key] != current[key]]
    if changed:
        print_rank_0(f"note: the lr schedule differs from the checkpoint's ({', '.join(changed)}); using the flags'")
    scheduler.load_state_dict(saved)


def load(args, ckpt: dict[str, Any] | None, model: nn.Module, optimizer, scheduler: AnnealingLR) -> TrainState:
    """Restore the state read from ``--load``; a fresh ``TrainState`` when it holds no checkpoint yet."""
    if ckpt is None:
        print_rank_0(f"no checkpoint found in {args.load}; starting from scratch")
        return TrainState()
    check_config(args.load, ckpt.get("config", {}), _model_config(model), SHAPE_KEYS)
    unwrap_model(model).load_state_dict(ckpt["model"])
    optimizer.reload_model_params()  # fp32 masters follow the loaded weights unless the optimizer state replaces them
    saved_seed = ckpt.get("args", {}).get("seed")
    if saved_seed is not None and saved_seed != args.seed:
        print_rank_0(f"warning: {args.load} was trained with --seed {saved_seed}, this run uses --seed {args.seed}; "
                     "the train/valid/test split of --train-data changes with the seed")
    release = ckpt["iteration"] == "release"
    if args.finetune or release:
        print_rank_0(f"loaded model weights from {args.load} (iteration reset to 0)")
        return TrainState()
    if not args.no_load_optim and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    iteration = int(ckpt["iteration"])
    _load_schedule(args, ckpt.get("lr_scheduler"), scheduler, iteration)
    if not args.no_load_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    consumed = ckpt.get("data", {}).get("consumed_samples")
    if args.resume_dataloader and consumed is None:
        print_rank_0(f"note: {args.load} holds no data-loader position; data starts from the first sample")
    state = TrainState(
        iteration=iteration,
        consumed_samples=int(consumed) if args.resume_dataloader and consumed is not None else 0,
        skipped_iters=int(ckpt.get("skipped_iters", 0)),
    )
    print_rank_0(f"loaded checkpoint from {args.load} at iteration {state.iteration}")
    return state


class MetricsLogger:
    """Console lines in Megatron's style, ``metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, log_dir: str | None) -> None:
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
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


def _reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
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


def _next_batch(iterator: Iterator | None) -> Any:
    return next(iterator) if iterator is not None else None


def train_step(
    forward_step: ForwardStep, iterator: Iterator | None, model: nn.Module, optimizer: FP16_Optimizer, scheduler,
    args, timers: Timers | None = None,
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """One iteration: forward, scaled backward, data-parallel reduction, clip and step; the step is
    skipped on every rank when any rank's loss or gradient norm is not finite (an fp16 overflow).

    ``timers`` (``--log-timers``) time the phases: ``data`` (the loader), ``forward`` (the batch's
    broadcast to the model-parallel group and the forward pass), ``backward``, ``allreduce`` (the local
    DDP's gradient all-reduce; torch DDP overlaps it with ``backward``) and ``optimizer`` (unscale,
    clip, step). Returns the metrics, the gradient norm and whether the step was skipped.
    """
    timers = timers or Timers(False)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    timers("data").start()
    batch = _next_batch(iterator)
    timers("data").stop()
    timers("forward").start()
    loss, metrics = forward_step(batch, model)
    timers("forward").stop()
    timers("backward").start()
    optimizer.backward(loss)
    timers("backward").stop()
    timers("allreduce").start()
    if isinstance(model, DistributedDataParallel):
        model.allreduce_gradients()
    timers("allreduce").stop()
    timers("optimizer").start()
    nonfinite_loss = not bool(torch.isfinite(loss.detach()).all())
    grad_norm, skipped = optimizer.step(args.clip_grad if args.clip_grad > 0 else math.inf, nonfinite_loss)
    if not skipped:
        scheduler.step()
    timers("optimizer").stop()
    return metrics, grad_norm, skipped


def evaluate(forward_step: ForwardStep, make_iterator: Callable[[], Iterator | None],
             model: nn.Module, eval_iters: int) -> dict[str, float]:
    """Average metrics over ``eval_iters`` batches (the same batches every time), without grads."""
    model.eval()
    iterator = make_iterator()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(eval_iters):
            _, metrics = forward_step(_next_batch(iterator), model)
            for key, value in _reduce_metrics(metrics).items():
                totals[key] = totals.get(key, 0.0) + value
    model.train()
    return {key: value / eval_iters for key, value in totals.items()}


def evaluate_and_print(name: str, split: str, forward_step, make_iterator, model, args,
                       iteration: int, logger: MetricsLogger) -> dict[str, float]:
    results = evaluate(forward_step, make_iterator, model, args.eval_iters)
    if "lm_loss" in results:
        loss = results["lm_loss"]  # a diverged (nan/inf) loss has no perplexity, not a clamped large one
        results["ppl"] = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    text = " | ".join(f"{k.replace('_', ' ')} value: {v:.6E}" for k, v in results.items())
    print_rank_0("-" * 80 + f"\n {name} at iteration {iteration} | {text}\n" + "-" * 80)
    logger.write({"iteration": iteration, "split": split, **results})
    return results


class _IntervalStats:
    """Accumulates training metrics between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.stepped = 0
        self.grad_norm = 0.0
        self.start = time.monotonic()

    def add(self, metrics: dict[str, float], grad_norm: float | None) -> None:
        """Add one iteration; ``grad_norm`` is ``None`` for a skipped (overflowed) step."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.stepped += 1
        self.count += 1


@dataclasses.dataclass
class Performance:
    """What a run's log lines need to report its speed: timers, model FLOPs per token and the peak for MFU."""

    timers: Timers
    device: torch.device
    flops_per_token: float
    peak_tflops: float | None
    peak_source: str = ""

    @classmethod
    def for_run(cls, args, model: nn.Module, device: torch.device) -> Performance:
        config = getattr(unwrap_model(model), "config", None)
        flops = model_flops_per_token(config, args.seq_length) if config is not None else 0.0
        peak, source = None, ""
        if args.peak_tflops or device.type == "cuda" or args.log_timers:
            peak, source = peak_tflops(device, precision_name(args), args.peak_tflops)
        if peak is not None:
            print_rank_0(f" > MFU against {peak:.1f} TFLOP/s per device ({source}); model FLOPs per token "
                         f"{flops / 1e6:.1f}M (6N + 12Lsh)")
        return cls(Timers(args.log_timers, device), device, flops, peak, source)


def log_training(stats: _IntervalStats, state: TrainState, args, optimizer: FP16_Optimizer, logger: MetricsLogger,
                 train_start: float, perf: Performance | None = None) -> None:
    elapsed = time.monotonic() - stats.start
    n = max(1, stats.count)
    means = {k: v / n for k, v in stats.sums.items()}
    tokens = stats.count * args.batch_size * args.data_parallel_size * args.seq_length
    record = {
        "iteration": state.iteration, "split": "train", **means, "lr": optimizer.param_groups[0]["lr"],
        "loss_scale": optimizer.loss_scale, "grad_norm": stats.grad_norm / max(1, stats.stepped),
        "skipped_iters": state.skipped_iters,
        "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": time.monotonic() - train_start,
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
        f" iteration {state.iteration:8d}/{args.train_iters:8d} | elapsed time per iteration (ms): "
        f"{1000 * elapsed / n:.1f} | learning rate {record['lr']:.3E} | {losses} | loss scale "
        f"{record['loss_scale']:.1f} | grad norm {record['grad_norm']:.3f} | skipped iterations "
        f"{state.skipped_iters} | tokens/s {record['tokens_per_s']:.0f} |{extra}"
    )
    logger.write(record)


def samples_needed(args) -> tuple[int, int, int]:
    """Global samples training, one validation pass and the test pass draw (sizes of a presampled blend)."""
    global_batch = args.batch_size * args.data_parallel_size
    return args.train_iters * global_batch, args.eval_iters * global_batch, args.eval_iters * global_batch


def _loaders(args, datasets, state: TrainState):
    """Train iterator and valid/test iterator factories, on each model-parallel group's first rank.

    A dataset with a true ``rank_sharded`` attribute (TFRecords) already holds only this
    data-parallel rank's share: the rank then draws whole batches from it alone.
    """
    from data_utils import make_data_loader

    train_ds, valid_ds, test_ds = datasets
    feeds = mpu.get_model_parallel_rank() == 0
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    def loader(dataset, consumed: int, shuffle: bool):
        if dataset is None or not feeds:
            return None
        if getattr(dataset, "rank_sharded", False):
            return iter(make_data_loader(dataset, args.batch_size, 0, 1, args.seed, consumed // dp_size,
                                         shuffle, args.num_workers, in_order=not args.shuffle))
        # A presampled dataset (a --data-path blend) is in its training order already.
        in_order = not args.shuffle or getattr(dataset, "presampled", False)
        return iter(make_data_loader(dataset, args.batch_size, dp_rank, dp_size, args.seed, consumed,
                                     shuffle, args.num_workers, in_order=in_order))

    def eval_factory(dataset):
        if dataset is None:
            return None
        return lambda: _cycle(lambda: loader(dataset, 0, False)) if feeds else None

    for name, dataset in (("valid", valid_ds), ("test", test_ds)):
        needed = args.batch_size * (1 if getattr(dataset, "rank_sharded", False) else dp_size)
        if dataset is not None and args.eval_iters > 0 and len(dataset) < needed:
            raise ArgumentError(
                f"the {name} split has {len(dataset)} samples, fewer than one global batch ({needed}); "
                "lower --batch-size or give it a larger share in --split"
            )
    train = loader(train_ds, state.consumed_samples, True)
    return train, eval_factory(valid_ds), eval_factory(test_ds)


def _cycle(make: Callable[[], Iterator | None]) -> Iterator:
    """Restart a finite iterator when it runs out, so evaluation always gets ``eval_iters`` batches."""
    while True:
        empty = True
        for batch in make():
            empty = False
            yield batch
        if empty:
            raise RuntimeError("evaluation data loader yielded no batch; lower --batch-size")


def _fp32_islands(args) -> Callable[[str, nn.Module], bool]:
    """Which submodules stay fp32 under --fp16/--bf16 (the seed's --fp32-* flags)."""
    embeddings = (nn.Embedding, mpu.VocabParallelEmbedding, mpu.ParallelEmbedding)

    def keep(name: str, module: nn.Module) -> bool:
        if isinstance(module, nn.LayerNorm):
            return args.fp32_layernorm
        if isinstance(module, embeddings):
            return args.fp32_tokentypes if "tokentype" in name else args.fp32_embedding
        return False

    return keep


def get_loss_scaler(args) -> LossScaler:
    """Dynamic scaling under --fp16 unless --loss-scale fixes it; no scaling for fp32 and bf16."""
    if not args.fp16:
        return LossScaler(1.0)
    if args.loss_scale:
        return LossScaler(args.loss_scale)
    return DynamicLossScaler(init_scale=args.initial_loss_scale, scale_window=int(args.loss_scale_window),
                             min_scale=args.min_scale, hysteresis=args.hysteresis)


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer layer in place (parameter names unchanged); how many.

    Layers rather than the whole model: the model-parallel collectives and the activation-checkpoint
    boundaries sit between layers, so each compiled graph is whole and the same for every layer.
    """
    from model.transformer import ParallelTransformerLayer

    layers = [m for m in model.modules() if isinstance(m, ParallelTransformerLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)
    print_rank_0(f" > compiled {len(layers)} transformer layers with torch.compile (backend {backend})")
    return len(layers)


def setup_model_and_optimizer(args, model_provider, padded_vocab_size: int, device: torch.device):
    model = model_provider(args, padded_vocab_size)
    if args.fp32_tokentypes and not any("tokentype" in name for name, _ in model.named_modules()):
        print_rank_0("note: --fp32-tokentypes has no effect: this model has no token-type embeddings (BERT has)")
    if args.fp16 or args.bf16:
        model = FP16_Module(model, torch.float16 if args.fp16 else torch.bfloat16, keep_fp32=_fp32_islands(args))
    model = model.to(device)
    if args.compile:
        compile_layers(model, args.compile_backend)
    if mpu.get_data_parallel_rank() == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}: {n_params}",
              flush=True)
    optimizer = FP16_Optimizer(get_optimizer(model, args), get_loss_scaler(args))
    model = wrap_data_parallel(model, args.DDP_impl, device, args.fp32_allreduce)
    scheduler = get_learning_rate_scheduler(optimizer, args)
    return model, optimizer, scheduler


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm it was told not to skip, or skipped too many steps.

    Every rank sees the same skipped steps, so every rank raises it at the same iteration."""

    agreed = True


class StopRequest:
    """SIGTERM / SIGUSR1 and ``--exit-duration-in-mins``, agreed by every rank at the end of an iteration.

    The handlers only record the signal; ``reason()`` (one tiny all-reduce over the job, MAX) tells
    every rank the same answer at the same iteration, so all of them save and exit together. The
    wall-time limit is judged on rank 0 alone. A second signal of the same kind acts as it did before
    (SIGTERM then terminates at once).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, args) -> None:
        self.received: int | None = None
        minutes = args.exit_duration_in_mins
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.minutes = minutes
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        """Put the handlers that were there before back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def reason(self) -> str | None:
        """Why every rank should stop now (the same on all of them), or None."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        flags = torch.tensor([
            float(self.received or 0),
            1.0 if rank0 and self.deadline is not None and time.monotonic() >= self.deadline else 0.0,
        ])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(mpu.collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, timed_out = int(flags[0].item()), bool(flags[1].item() > 0)
        if signum:
            return f"received {signal.Signals(signum).name}"
        if timed_out:
            return f"--exit-duration-in-mins {self.minutes:g} reached"
        return None


class _SkipWatch:
    """Counts skipped steps: stops a run that skips too many, or (``--abort-on-nonfinite``) any that is
    not fp16's expected overflow."""

    def __init__(self, args, optimizer: FP16_Optimizer) -> None:
        self.args = args
        self.recent: deque[bool] = deque(maxlen=args.skipped_window)
        # Under fp16 with a dynamic scale, an overflow is how the scale finds its level: not a divergence.
        self.overflow_expected = args.fp16 and isinstance(optimizer.loss_scaler, DynamicLossScaler)

    def add(self, iteration: int, skipped: bool, loss_scale: float) -> None:
        self.recent.append(skipped)
        if skipped and not self.overflow_expected:
            if self.args.abort_on_nonfinite:
                raise NonFiniteError(f"iteration {iteration}: the loss or gradient norm is not finite; stopping "
                                     "without saving (--abort-on-nonfinite); resume from the last checkpoint, "
                                     "perhaps with a lower --lr")
            print_rank_0(f"iteration {iteration}: the loss or gradient norm is not finite; the step was skipped "
                         "on every rank")
        window = self.recent.maxlen
        if len(self.recent) == window and sum(self.recent) > self.args.max_skipped_fraction * window:
            raise NonFiniteError(
                f"iteration {iteration}: {sum(self.recent)} of the last {window} steps were skipped (more than "
                f"--max-skipped-fraction {self.args.max_skipped_fraction:g}; loss scale {loss_scale:g}): the run "
                "is diverging; resume from the last checkpoint with a lower --lr or more --warmup")


@dataclasses.dataclass
class _RunOutcome:
    """How ``_train`` ended: the last validation results (and their iteration), and whether it exited early."""

    valid: dict[str, float] | None = None
    valid_iteration: int | None = None
    exited: bool = False
    stopped: str | None = None


def _train(args, forward_step, model, optimizer, scheduler, state, train_iter, valid_factory,
           logger) -> _RunOutcome:
    """Train until ``--train-iters`` or an ``--exit-interval``, saving on schedule and at the end."""
    outcome = _RunOutcome()
    saved_at = state.iteration  # what --load gave us is on disk already

    def checkpoint() -> None:
        nonlocal saved_at
        if args.save and saved_at != state.iteration:
            save(args, state, model, optimizer, scheduler)
            saved_at = state.iteration

    def validate() -> None:
        outcome.valid = evaluate_and_print("validation loss", "valid", forward_step, valid_factory, model, args,
                                           state.iteration, logger)
        outcome.valid_iteration = state.iteration

    evaluating = bool(valid_factory and args.eval_interval and args.eval_iters > 0)
    if evaluating and state.iteration == 0:
        validate()  # the starting point, so that a run shows how far its validation loss fell
    stats = _IntervalStats()
    train_start = time.monotonic()
    global_batch = args.batch_size * args.data_parallel_size
    watch = _SkipWatch(args, optimizer)
    device = next(unwrap_model(model).parameters()).device
    perf = Performance.for_run(args, model, device)
    memory_reported = False
    stop = StopRequest(args)
    try:
        while state.iteration < args.train_iters:
            metrics, grad_norm, skipped = train_step(forward_step, train_iter, model, optimizer, scheduler, args,
                                                     perf.timers)
            if not memory_reported:
                memory = ", ".join(f"{k[:-3].replace('_', ' ')} {v:.1f} MB" for k, v in peak_memory_mb(device).items())
                print_rank_0(f" > memory after the first iteration: {memory}")
                memory_reported = True
            state.iteration += 1
            state.consumed_samples += global_batch
            state.skipped_iters += int(skipped)
            stats.add(_reduce_metrics(metrics), None if skipped else grad_norm)
            watch.add(state.iteration, skipped, optimizer.loss_scale)
            if state.iteration % args.log_interval == 0:
                log_training(stats, state, args, optimizer, logger, train_start, perf)
                stats.reset()
            if args.save_interval and state.iteration % args.save_interval == 0:
                checkpoint()
            if evaluating and state.iteration % args.eval_interval == 0:
                validate()
            if args.exit_interval and state.iteration % args.exit_interval == 0 and state.iteration < args.train_iters:
                checkpoint()
                print_rank_0(f"exiting at iteration {state.iteration} (--exit-interval {args.exit_interval})")
                outcome.exited = True
                return outcome
            reason = stop.reason()
            if reason is not None and state.iteration < args.train_iters:
                checkpoint()
                resume = "; rerun the same command to continue" if args.save else " (no --save: nothing was saved)"
                print_rank_0(f"exiting at iteration {state.iteration}: {reason}{resume}")
                outcome.exited, outcome.stopped = True, reason
                return outcome
        checkpoint()
        return outcome
    finally:
        stop.restore()


def check_run_paths(args) -> None:
    """Before any work: every directory flag usable, ``--load`` naming a checkpoint directory, and no
    ``--save`` that would write over another run's checkpoints."""
    cache = args.cache_dir  # the default "cache" is made only when a run writes there
    if cache and not os.path.exists(cache) and "cache_dir" not in getattr(args, "explicit_flags", ()):
        cache = None
    for flag, path in (("--save", args.save), ("--log-dir", args.log_dir), ("--cache-dir", cache)):
        if path:
            writable_directory(path, flag)
    same = bool(args.load and args.save) and os.path.realpath(args.load) == os.path.realpath(args.save)
    if args.load and not (args.load_openai or args.eval_hf):
        root = None if os.path.isfile(get_checkpoint_tracker_filename(args.load)) else checkpoint_root_of(args.load)
        if root is not None:
            kind = "a checkpoint file" if os.path.isfile(args.load) else "a folder inside a checkpoint"
            raise ArgumentError(f"--load {args.load} is {kind}; pass the directory holding {TRACKER_FILENAME}: "
                                f"--load {root}")
        if os.path.exists(args.load) and not os.path.isdir(args.load):
            raise ArgumentError(f"--load {args.load}: is a file, not a checkpoint directory")
        if not os.path.exists(args.load) and not same:
            raise ArgumentError(f"--load {args.load}: no such directory")
    if args.save and os.path.isfile(get_checkpoint_tracker_filename(args.save)) and not same \
            and not args.overwrite_checkpoints:
        raise ArgumentError(f"--save {args.save} already holds another run's checkpoints; pass --load {args.save} "
                            "to continue that run, or choose a new --save directory (--overwrite-checkpoints starts "
                            "over in it)")
    if args.save:
        for path in remove_orphaned_temporaries(args.save):
            print_rank_0(f"removed {path}, left by a save that was killed")


def _check_data_paths(args) -> None:
    """The corpora named by --train-data/--valid-data/--test-data exist (files or configured aliases)."""
    from data_utils import resolve_corpora

    for names in (args.train_data, args.valid_data, args.test_data):
        if not names:
            continue
        if getattr(args, "use_tfrecords", False):
            missing = [name for name in names if not os.path.isfile(name)]
            if missing:
                raise ArgumentError(f"TFRecord file {missing[0]}: no such file")
        else:
            resolve_corpora(names, args.cache_dir)


def _check_setup(args) -> dict[str, Any] | None:
    """Everything that can be checked before expensive work: directories, data paths, and the --load
    checkpoint against the flags (its model-parallel size and shape). Returns the checkpoint read."""
    check_run_paths(args)
    _check_data_paths(args)
    ckpt = read_load_state(args) if args.load else None
    if ckpt is not None and ckpt.get("config"):  # shape flags left out take the checkpoint's
        adopt_stored_shape(args, args.load, ckpt["config"])
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{args.max_position_embeddings}" + (f" (the checkpoint's in {args.load})" if ckpt else ""))
    return ckpt


def all_ranks_agree(check: Callable[[], Any]) -> Any:
    """Run ``check`` on every rank; a user mistake on any rank stops all of them together.

    Without this a rank that fails alone (a node that cannot see ``--save``) exits while the others
    wait for it in their first collective. Every rank raises the first failing rank's error, marked
    ``agreed`` so that only rank 0 prints it.
    """
    from data_utils.errors import DataError

    error: BaseException | None = None
    result = None
    try:
        result = check()
    except (*USER_ERRORS, DataError) as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            everywhere = len(failed) == len(messages) and all(m == message for _, m in failed)
            if error is None or not everywhere:
                error = ArgumentError(message if everywhere else f"rank {rank}: {message}")
            error.agreed = True
    if error is not None:
        raise error
    return result


def pretrain(args, model_provider, data_provider, forward_step_provider) -> dict[str, Any]:
    """Run a whole training job; returns the final evaluation results and output paths.

    ``forward_step_provider(args, tokenizer, device)`` builds the ``forward_step``.
    """
    device = initialize_distributed(args)
    ckpt = all_ranks_agree(lambda: _check_setup(args))
    set_random_seed(args.seed)
    tokenizer, *datasets = data_provider(args)
    if args.train_iters > 0 and datasets[0] is None:
        raise ArgumentError("no training data: give --train-data or --data-path (and a --split with a train share)")
    padded = pad_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                            args.model_parallel_size)
    saved = ckpt.get("config", {}) if ckpt is not None else {}
    if saved.get("unpadded_vocab_size") == tokenizer.vocab_size:
        padded = saved["vocab_size"]  # the checkpoint's padding (an import's or a reshard's) for the same tokenizer
    print_rank_0(f" > padded vocab (size: {tokenizer.vocab_size}) with {padded - tokenizer.vocab_size} "
                 f"dummy tokens (new size: {padded})")
    args.unpadded_vocab_size = tokenizer.vocab_size  # the padded entries get no probability
    model, optimizer, scheduler = setup_model_and_optimizer(args, model_provider, padded, device)
    state = load(args, ckpt, model, optimizer, scheduler) if args.load else TrainState()
    del ckpt  # the model and optimizer hold their copies now
    forward_step = forward_step_provider(args, tokenizer, device)
    train_iter, valid_factory, test_factory = _loaders(args, datasets, state)
    logger = MetricsLogger(args.log_dir)
    outcome = _train(args, forward_step, model, optimizer, scheduler, state, train_iter, valid_factory, logger)
    results: dict[str, Any] = {"iteration": state.iteration, "save": args.save, "metrics": logger.path}
    if outcome.stopped:
        results["stopped"] = outcome.stopped
    if outcome.exited or args.eval_iters <= 0:
        return results
    if outcome.valid_iteration == state.iteration:
        results["valid"] = outcome.valid  # validation just ran on --eval-interval
    elif valid_factory is not None:
        results["valid"] = evaluate_and_print("validation loss at the end of training", "valid", forward_step,
                                              valid_factory, model, args, state.iteration, logger)
    if test_factory is not None:
        results["test"] = evaluate_and_print("test loss at the end of training", "test", forward_step,
                                             test_factory, model, args, state.iteration, logger)
    return results


def print_run_summary(results: dict[str, Any], describe_valid: Callable[[dict[str, float]], str]) -> None:
    """Rank 0's last line of a training run: iteration, validation (``describe_valid``), where outputs went."""
    summary = [f"trained to iteration {results['iteration']}"]
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


USER_ERRORS: tuple[type[BaseException], ...] = (ArgumentError, CheckpointError, NonFiniteError)


_LOST_CONTACT = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")


def lost_contact(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died or hung (not a bug of this rank)."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(err, backend_error):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _LOST_CONTACT)


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point, turning a user mistake into one line on stderr and exit status 1."""
    from data_utils.errors import DataError

    try:
        main()
    except (*USER_ERRORS, DataError) as err:
        # An error every rank raised together is printed once, by rank 0.
        if not (getattr(err, "agreed", False) and dist.is_initialized() and dist.get_rank() != 0):
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RuntimeError as err:
        if not lost_contact(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        detail = str(err).splitlines()[0].split("] ", 1)[-1][:160]
        print(f"error: rank {rank} lost contact with another rank of the job ({detail}); a rank died or stopped "
              "answering within --distributed-timeout-minutes: see that rank's log", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        set_preparation_group(None)
        if dist.is_initialized():
            mpu.destroy_model_parallel()
            dist.destroy_process_group()
