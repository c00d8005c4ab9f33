"""The shared training loop: set-up, train, evaluate, checkpoint and log.

An entry script gives ``pretrain`` three things:

* ``model_provider(config: TransformerConfig) -> nn.Module`` -- the bare model (on CPU) of the config
  ``restore.decide_model_config`` decided (flags, tokenizer and ``--load``'s stored config);
* ``data_provider(args) -> (tokenizer, train, valid, test)`` -- datasets (``None`` when empty);
* ``forward_step(batch, model) -> (loss, metrics)`` -- ``batch`` is the loader's dict on the first
  rank of each model-parallel group and ``None`` elsewhere (share it with ``mpu.broadcast_data``);
  ``metrics`` maps names such as ``lm_loss`` to detached scalar tensors. On a pipeline stage before the
  last (``not mpu.is_pipeline_last_stage()``) it returns the model's output (the stage's hidden states)
  and no metrics, which ``schedules.run_schedule`` sends on to the next stage.

``forward_step`` comes from ``forward_step_provider(args, tokenizer, device)``; a model family's config
defaults (``model.BERT_DEFAULTS``) come as ``pretrain(..., model_defaults=...)``. Checkpoints, metrics,
stop requests and distributed set-up live in ``restore``, ``metrics``, ``resilience`` and ``initialize``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import mpu
from arguments import batch_schedule, distributed_settings
from data_utils import make_data_loader, resolve_corpora
from errors import ArgumentError, Interrupted
from fp16 import DistributedOptimizer, FP16_Module, FP16_Optimizer
from fp16.loss_scaler import DynamicLossScaler, LossScaler
from initialize import all_ranks_agree, initialize_distributed, print_rank_0, set_random_seed
from learning_rates import AnnealingLR
from metrics import IntervalStats, MetricsLogger, log_evaluation, log_training, reduce_metrics
from model import ParallelTransformerLayer, TransformerConfig, optimizer_param_groups
from model.distributed import DistributedDataParallel, unwrap_model, wrap_data_parallel
from parallel_layout import virtual_pipeline_size
from performance import Performance, Timers, peak_memory_mb, precision_name, training_state_bytes
from resilience import CTRL_C, SkipWatch, StopRequest
from restore import (
    TrainState,
    check_run_paths,
    decide_model_config,
    decide_shape,
    load,
    lock_save,
    read_start_state,
    save,
)
from schedules import forward_only_order, run_schedule, share_from_last_stage, training_order

ForwardStep = Callable[[Any, nn.Module], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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


def _next_batch(iterator: Iterator | None) -> Any:
    return next(iterator) if iterator is not None else None


def train_step(
    forward_step: ForwardStep, iterator: Iterator | None, model: nn.Module, optimizer: FP16_Optimizer, scheduler,
    args, timers: Timers | None = None, num_micro_batches: int = 1,
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """One iteration on one global batch: forward and scaled backward on each of ``num_micro_batches``
    micro-batches (gradients accumulate; each micro-batch's loss counts ``1 / num_micro_batches``, so
    the step sees their mean), one data-parallel reduction, then clip and step. The step is skipped on
    every rank when any rank's loss on any micro-batch, or the gradient norm, is not finite (an fp16
    overflow). Without pipeline parallelism activations live for one micro-batch at a time; with it the
    micro-batches flow through the stages by ``schedules.training_order`` (1F1B, interleaved with
    virtual stages), the tied word embeddings' gradients are summed over the first and last stage, and
    the last stage's metrics are shared with the others.

    A forward step with a ``start_iteration(batches)`` method is shown the iteration's micro-batches
    first (BERT counts the predicted tokens of the whole global batch there).

    ``timers`` (``--log-timers``) time the phases: ``data`` (the loader), ``forward`` (the batch's
    broadcast to the model-parallel group and the forward pass), ``backward``, ``allreduce`` (the local
    DDP's gradient all-reduce; torch DDP overlaps it with the last ``backward``), ``optimizer``
    (unscale, clip, step) and with pipeline parallelism ``pipeline`` (waiting for the other stages),
    summed over the micro-batches. Returns the metrics (means over the
    micro-batches), the gradient norm and whether the step was skipped.
    """
    timers = timers or Timers(False)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    timers("data").start()
    batches = [_next_batch(iterator) for _ in range(num_micro_batches)]
    timers("data").stop()
    start_iteration = getattr(forward_step, "start_iteration", None)
    if start_iteration is not None:
        start_iteration(batches)
    totals, finite = run_schedule(training_order(num_micro_batches), forward_step, batches, model,
                                  optimizer.backward, timers)
    if num_micro_batches > 1:
        totals = {key: value / num_micro_batches for key, value in totals.items()}
    timers("allreduce").start()
    mpu.allreduce_sequence_parallel_gradients(model)  # --sequence-parallel's LayerNorm weights and biases
    if isinstance(model, DistributedDataParallel) and not getattr(optimizer, "reduces_gradients", False):
        model.allreduce_gradients()  # (a distributed optimizer reduce-scatters them in its step instead)
    mpu.allreduce_tied_embedding_gradients(model)  # pipeline: the first and last stage's word embeddings
    timers("allreduce").stop()
    totals = share_from_last_stage(totals, _device_of(model))
    timers("optimizer").start()
    nonfinite_loss = bool(finite) and not bool(torch.stack(finite).all())
    grad_norm, skipped = optimizer.step(args.clip_grad if args.clip_grad > 0 else math.inf, nonfinite_loss)
    if not skipped:
        scheduler.step()
    timers("optimizer").stop()
    return totals, grad_norm, skipped


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(forward_step: ForwardStep, make_iterator: Callable[[], Iterator | None],
             model: nn.Module, eval_iters: int) -> dict[str, float]:
    """Average metrics over ``eval_iters`` batches (the same batches every time), without grads."""
    model.eval()
    iterator = make_iterator()
    totals: dict[str, float] = {}
    order = forward_only_order(1, mpu.get_virtual_pipeline_model_parallel_world_size())
    with torch.no_grad():
        for _ in range(eval_iters):
            metrics, _ = run_schedule(order, forward_step, [_next_batch(iterator)], model, None)
            metrics = share_from_last_stage(metrics, _device_of(model))
            for key, value in reduce_metrics(metrics).items():
                totals[key] = totals.get(key, 0.0) + value
    model.train()
    return {key: value / eval_iters for key, value in totals.items()}


def evaluate_and_print(name: str, split: str, forward_step, make_iterator, model, args,
                       iteration: int, logger: MetricsLogger) -> dict[str, float]:
    """Evaluate ``--eval-iters`` batches, print and log them (with perplexity)."""
    return log_evaluation(logger, name, split, iteration, evaluate(forward_step, make_iterator, model, args.eval_iters))


def eval_batch_size(args) -> int:
    """Samples per data-parallel rank in one validation or test batch (``--eval-batch-size``)."""
    return args.eval_batch_size or args.micro_batch_size


def samples_needed(args) -> tuple[int, int, int]:
    """Global samples training (the ramp-up included), one validation pass and the test pass draw (sizes
    of a presampled blend)."""
    evaluation = args.eval_iters * eval_batch_size(args) * args.data_parallel_size
    return batch_schedule(args).samples_after(args.train_iters), evaluation, evaluation


def build_data_iterators(args, datasets, state: TrainState):
    """Train iterator and valid/test iterator factories, on each model-parallel group's first rank.

    A dataset with a true ``rank_sharded`` attribute (TFRecords) already holds only this
    data-parallel rank's share: the rank then draws whole batches from it alone.
    """
    train_ds, valid_ds, test_ds = datasets
    feeds = mpu.get_model_parallel_rank() == 0
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    def loader(dataset, batch_size: int, consumed: int, shuffle: bool):
        if dataset is None or not feeds:
            return None
        if getattr(dataset, "rank_sharded", False):
            return iter(make_data_loader(dataset, batch_size, 0, 1, args.seed, consumed // dp_size,
                                         shuffle, args.num_workers, in_order=not args.shuffle))
        # A presampled dataset (a --data-path blend) is in its training order already.
        in_order = not args.shuffle or getattr(dataset, "presampled", False)
        return iter(make_data_loader(dataset, batch_size, dp_rank, dp_size, args.seed, consumed,
                                     shuffle, args.num_workers, in_order=in_order))

    evaluation_batch = eval_batch_size(args)

    def eval_factory(dataset):
        if dataset is None:
            return None
        return lambda: _cycle(lambda: loader(dataset, evaluation_batch, 0, False)) if feeds else None

    for name, dataset in (("valid", valid_ds), ("test", test_ds)):
        needed = evaluation_batch * (1 if getattr(dataset, "rank_sharded", False) else dp_size)
        if dataset is not None and args.eval_iters > 0 and len(dataset) < needed:
            raise ArgumentError(
                f"the {name} split has {len(dataset)} samples, fewer than one evaluation batch over the "
                f"data-parallel ranks ({needed}); lower --eval-batch-size (or --micro-batch-size) or give it a "
                "larger share in --split"
            )
    # Micro-batches in order: the iteration after ``consumed`` samples takes the next global batch of them.
    train = loader(train_ds, args.micro_batch_size, state.data_samples, True)
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
    layers = [m for m in model.modules() if isinstance(m, ParallelTransformerLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)
    print_rank_0(f" > compiled {len(layers)} transformer layers with torch.compile (backend {backend})")
    return len(layers)


def setup_model_and_optimizer(args, model_provider, config: TransformerConfig, device: torch.device):
    """The model of ``config`` (mixed precision, compiled, data-parallel as the flags say), its optimizer
    and learning-rate schedule."""
    model = model_provider(config)
    if args.fp32_tokentypes and not any("tokentype" in name for name, _ in model.named_modules()):
        print_rank_0("note: --fp32-tokentypes has no effect: this model has no token-type embeddings (BERT has)")
    if args.fp16 or args.bf16:
        model = FP16_Module(model, args.params_dtype, keep_fp32=_fp32_islands(args))
    model = model.to(device)
    if args.compile:
        compile_layers(model, args.compile_backend)
    if mpu.get_data_parallel_rank() == 0:
        n_params = sum(p.numel() for p in model.parameters())
        stage = (f", pipeline stage {mpu.get_pipeline_model_parallel_rank()}"
                 if mpu.get_pipeline_model_parallel_world_size() > 1 else "")
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}{stage}: {n_params}",
              flush=True)
    if args.use_distributed_optimizer:
        optimizer = DistributedOptimizer(get_optimizer(model, args), get_loss_scaler(args))
    else:
        optimizer = FP16_Optimizer(get_optimizer(model, args), get_loss_scaler(args))
    model = wrap_data_parallel(model, args.DDP_impl, device, args.fp32_allreduce, args.overlap_grad_reduce)
    scheduler = get_learning_rate_scheduler(optimizer, args)
    return model, optimizer, scheduler


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
    stats = IntervalStats()
    train_start = time.monotonic()
    schedule = batch_schedule(args)
    # Under fp16 with a dynamic scale, an overflow is how the scale finds its level: not a divergence.
    watch = SkipWatch(args.skipped_window, args.max_skipped_fraction, args.abort_on_nonfinite,
                      overflow_expected=args.fp16 and isinstance(optimizer.loss_scaler, DynamicLossScaler))
    device = next(unwrap_model(model).parameters()).device
    perf = Performance.for_run(getattr(unwrap_model(model), "config", None), args.seq_length, device,
                               precision_name(args.params_dtype), args.log_timers, args.peak_tflops)
    memory_reported = False
    stop = StopRequest(args.exit_duration_in_mins)
    try:
        while state.iteration < args.train_iters:
            global_batch = schedule.global_batch_at(state.consumed_samples)
            micro_batches = global_batch // schedule.samples_per_micro_step
            metrics, grad_norm, skipped = train_step(forward_step, train_iter, model, optimizer, scheduler, args,
                                                     perf.timers, micro_batches)
            if not memory_reported:
                memory = ", ".join(f"{k[:-3].replace('_', ' ')} {v:.1f} MB" for k, v in peak_memory_mb(device).items())
                held = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in
                                 training_state_bytes(model, optimizer).items())
                print_rank_0(f" > memory after the first iteration: {memory}; this rank holds {held}")
                memory_reported = True
            state.iteration += 1
            state.consumed_samples += global_batch
            state.data_samples += global_batch
            state.skipped_iters += int(skipped)
            stats.add(reduce_metrics(metrics), None if skipped else grad_norm, global_batch * args.seq_length)
            watch.add(state.iteration, skipped, optimizer.loss_scale)
            if state.iteration % args.log_interval == 0:
                log_training(logger, stats, iteration=state.iteration, train_iters=args.train_iters,
                             skipped_iters=state.skipped_iters, lr=optimizer.param_groups[0]["lr"],
                             loss_scale=optimizer.loss_scale, train_start=train_start, perf=perf,
                             batch={"global_batch_size": global_batch, "micro_batch_size": args.micro_batch_size,
                                    "accumulation_steps": micro_batches})
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
                if reason == CTRL_C:  # exit status 130, as for any Ctrl-C
                    raise Interrupted(f"Ctrl-C: stopped at iteration {state.iteration}{resume}")
                print_rank_0(f"exiting at iteration {state.iteration}: {reason}{resume}")
                outcome.exited, outcome.stopped = True, reason
                return outcome
        checkpoint()
        return outcome
    finally:
        stop.restore()


def _check_data_paths(args) -> None:
    """The corpora named by --train-data/--valid-data/--test-data exist (files or configured aliases)."""
    for names in (args.train_data, args.valid_data, args.test_data):
        if not names:
            continue
        if args.use_tfrecords:
            missing = [name for name in names if not os.path.isfile(name)]
            if missing:
                raise ArgumentError(f"TFRecord file {missing[0]}: no such file")
        else:
            resolve_corpora(names, args.cache_dir)


def _check_setup(args) -> tuple[dict[str, Any] | None, str]:
    """Everything that can be checked before expensive work: directories, data paths, and the --load
    checkpoint (or --pretrained-bert's weights) against the flags (its model-parallel size and shape).
    Returns the state read and where it came from."""
    check_run_paths(args)
    _check_data_paths(args)
    ckpt, where = read_start_state(args)
    decide_shape(args, (ckpt or {}).get("config"), where)
    return ckpt, where


def pretrain(args, model_provider, data_provider, forward_step_provider,
             model_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a whole training job; returns the final evaluation results and output paths. Global rank 0
    holds the lock of ``--save`` throughout (``restore.lock_save``)."""
    device = initialize_distributed(**distributed_settings(args))
    lock = all_ranks_agree(lambda: lock_save(args))  # first: another run's writes make the other checks moot
    try:
        ckpt, where = all_ranks_agree(lambda: _check_setup(args))
        return _pretrain(args, ckpt, where, device, model_provider, data_provider, forward_step_provider,
                         model_defaults)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(args, ckpt, where: str, device, model_provider, data_provider, forward_step_provider,
              model_defaults: dict[str, Any] | None) -> dict[str, Any]:
    set_random_seed(args.seed)
    tokenizer, *datasets = data_provider(args)
    if args.train_iters > 0 and datasets[0] is None:
        raise ArgumentError("no training data: give --train-data or --data-path (and a --split with a train share)")
    config = decide_model_config(args, tokenizer.vocab_size, (ckpt or {}).get("config"), where, model_defaults)
    print_rank_0(f" > padded vocab (size: {tokenizer.vocab_size}) with {config.vocab_size - tokenizer.vocab_size} "
                 f"dummy tokens (new size: {config.vocab_size})")
    mpu.set_virtual_pipeline_model_parallel_world_size(virtual_pipeline_size(
        config.num_layers, args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage))
    model, optimizer, scheduler = setup_model_and_optimizer(args, model_provider, config, device)
    batches = batch_schedule(args).describe()
    print_rank_0(f" > {batches}")
    state = load(args, ckpt, model, optimizer, scheduler, where) if args.load or ckpt else TrainState()
    del ckpt  # the model and optimizer hold their copies now
    forward_step = forward_step_provider(args, tokenizer, device)
    train_iter, valid_factory, test_factory = build_data_iterators(args, datasets, state)
    logger = MetricsLogger(args.log_dir)
    outcome = _train(args, forward_step, model, optimizer, scheduler, state, train_iter, valid_factory, logger)
    results: dict[str, Any] = {"iteration": state.iteration, "batches": batches, "save": args.save,
                               "metrics": logger.path}
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
