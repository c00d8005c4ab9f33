"""Capacity planner: which layouts fit a model on N GPUs, and how fast each should run.

    python tools/plan.py --model gpt2-8.3b --cluster v100-dgx2 --gpus 512
    python tools/plan.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \\
        --max-position-embeddings 2048 --cluster a100-dgx --gpus 64 --global-batch-size 512
    python tools/plan.py --validate              # the published rows: published vs predicted, exit 1 past 15%
    python tools/plan.py --model gpt2-345m --calibrate --gpus 2   # plan for this machine, measured

The model (memory and time estimates, presets, the layouts tried, the published rows) is
``capacity_planner.py`` at the repository's root; its docstring says how each part is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capacity_planner import (  # noqa: E402
    CALIBRATION_ROW,
    CLUSTERS,
    EFFICIENCY_TOLERANCE,
    GIB,
    MODELS,
    PUBLISHED,
    ROW_TOLERANCE,
    SEED_BASELINE,
    SEED_EFFICIENCY,
    SEED_SCALED,
    Cluster,
    Estimate,
    Layout,
    ModelSpec,
    TimeConstants,
    check_rows,
    check_shape,
    fit_gemm_efficiency,
    plan,
    published_spec,
    seed_scaling,
    tflops_per_gpu,
)
from errors import ArgumentError  # noqa: E402
from initialize import run_main  # noqa: E402
from performance import measure_allreduce_gbps, measure_matmul_tflops  # noqa: E402

# --- the published rows ---------------------------------------------------------------------------------------------


def validate(c: TimeConstants | None = None) -> tuple[list[str], bool]:
    """The published-vs-predicted table, and whether every row is within the tolerances."""
    c = TimeConstants() if c is None else c
    lines = [f"time model: E = {c.gemm_efficiency} (refitted on the {PUBLISHED[CALIBRATION_ROW][0]} row: "
             f"{fit_gemm_efficiency()}); A100 80 GB, bf16, attention unfused as in the published runs",
             "| params | published layout | published TFLOP/s | predicted | error | planner's pick on these GPUs | "
             "its speed-up |", "| --- | --- | --- | --- | --- | --- | --- |"]
    ok = True
    for index, check in enumerate(check_rows(c)):
        spec = published_spec(PUBLISHED[index])
        ok &= index == CALIBRATION_ROW or abs(check.error) <= ROW_TOLERANCE
        ok &= check.pick_fits and check.pick_speedup >= 1 - 1e-9
        lines.append(f"| {check.name} | {describe(check.layout, spec)} | {check.published} | {check.predicted:.1f} | "
                     f"{100 * check.error:+.1f}%{' (calibration)' if index == CALIBRATION_ROW else ''} | "
                     f"{describe(check.pick, spec)} | {check.pick_speedup:.2f}x |")
    one, many = seed_scaling(c)
    ok &= abs(many / one - SEED_EFFICIENCY) <= EFFICIENCY_TOLERANCE
    lines.append(f"seed, V100 DGX-2H fp16: 1.2B on 1 GPU {one:.1f} TFLOP/s (published {SEED_BASELINE[3]:.0f}); "
                 f"8.3B on 512 GPUs {many * 512 / 1000:.1f} PFLOP/s (published {SEED_SCALED[3] / 1000:.1f}); "
                 f"weak scaling {100 * many / one:.0f}% (published {100 * SEED_EFFICIENCY:.0f}%)")
    lines.append(f"every row within {100 * ROW_TOLERANCE:.0f}%, the scaling within {100 * EFFICIENCY_TOLERANCE:.0f} "
                 f"points, every pick fits and is as fast: {'yes' if ok else 'NO'}")
    return lines, ok


# --- measuring this machine -----------------------------------------------------------------------------------------


def measure_copy_gbps() -> float:
    """Memory bandwidth (GB/s, read + write) of copying a 256-MB tensor on the GPU, or on CPU."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    source = torch.ones(2**26, device=device)
    target = torch.empty_like(source)
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def measured_cluster(gpus: int) -> Cluster:
    """This machine as a one-node cluster of ``gpus`` devices (CPU: processes), its rates measured."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / gpus
    peak = measure_matmul_tflops(torch.bfloat16 if cuda else torch.float32, 4096 if cuda else 1024)
    try:
        links = measure_allreduce_gbps(2) if gpus > 1 else 1.0
    except RuntimeError as err:
        raise ArgumentError(f"--calibrate: {err}; plan with --cluster or the cluster's numbers instead") from None
    # On CPU dropout sends attention down the unfused path that keeps the scores.
    return Cluster("this machine (measured)", gpus, memory_gib, peak, measure_copy_gbps(), links, links * gpus,
                   "bf16" if cuda else "fp32", fused_attention=cuda, gemm_efficiency=1.0)


# --- output ---------------------------------------------------------------------------------------------------------


def describe(layout: Layout, spec: ModelSpec) -> str:
    """``T2 P4 v2 D8 mb1 ckpt dopt sp``: a layout in a few characters."""
    flags = [name for name, on in (("ckpt", layout.checkpoint), ("dopt", layout.distributed_optimizer),
                                   ("sp", layout.sequence_parallel)) if on]
    virtual = f" v{layout.virtual}" if layout.virtual > 1 else ""
    return " ".join([f"T{layout.tp} P{layout.pp}{virtual} D{layout.dp} mb{layout.micro_batch}", *flags])


def format_estimates(estimates: list[Estimate], spec: ModelSpec, global_batch: int, top: int) -> list[str]:
    lines = ["rank  layout                          |  GiB per GPU: weights grads optim activ  temp  total |"
             "  s per step: compute tensor pipeline  data  total | TFLOP/s per GPU"]
    for rank, est in enumerate(estimates[:top], 1):
        mem = [est.memory[k] / GIB for k in ("weights", "gradients", "optimizer", "activations", "temporary",
                                             "total")]
        sec = [est.seconds[k] for k in ("compute", "tensor", "pipeline", "data")]
        lines.append(f"{rank:>4}  {describe(est.layout, spec):<31} | " + " ".join(f"{v:6.1f}" for v in mem)
                     + "        | " + " ".join(f"{v:7.2f}" for v in sec) + f" {est.step:7.2f} | "
                     + _rate(tflops_per_gpu(spec, est.layout, global_batch, est.step))
                     + ("" if est.fits else "  (does not fit)"))
    return lines


def _rate(tflops: float) -> str:
    return f"{tflops:6.1f}" if tflops >= 1 else f"{tflops:6.3f}"  # a CPU's rate is a fraction of a TFLOP/s


def launch_command(spec: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int) -> str:
    """The torchrun command line that runs ``layout`` (data and tokenizer flags still to add)."""
    gpus = layout.tp * layout.pp * layout.dp
    per_node = min(gpus, cluster.gpus_per_node)
    nodes = gpus // per_node
    launcher = ["torchrun", "--standalone"] if nodes == 1 else [
        "torchrun", "--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", "$MASTER_ADDR:29500"]
    args = [*launcher, "--nproc_per_node", str(per_node), f"pretrain_{spec.kind}.py",
            "--num-layers", spec.num_layers, "--hidden-size", spec.hidden_size,
            "--num-attention-heads", spec.num_attention_heads, "--seq-length", spec.seq_length,
            "--max-position-embeddings", spec.max_position_embeddings]
    if spec.intermediate_size:
        args += ["--intermediate-size", spec.intermediate_size]
    if spec.divisible_by != 128:
        args += ["--make-vocab-size-divisible-by", spec.divisible_by]
    if spec.kind == "bert" and spec.max_preds_per_seq:
        args += ["--max-preds-per-seq", spec.max_preds_per_seq]
    args += ["--model-parallel-size", layout.tp]
    if layout.pp > 1:
        args += ["--pipeline-model-parallel-size", layout.pp]
    if layout.virtual > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", spec.num_layers // (layout.pp * layout.virtual)]
    args += ["--micro-batch-size", layout.micro_batch, "--global-batch-size", global_batch]
    args += [flag for flag, on in (("--checkpoint-activations", layout.checkpoint),
                                   ("--use-distributed-optimizer", layout.distributed_optimizer),
                                   ("--overlap-grad-reduce", layout.dp > 1 and not layout.distributed_optimizer),
                                   ("--sequence-parallel", layout.sequence_parallel),
                                   (f"--{cluster.precision}", cluster.precision != "fp32")) if on]
    words = [str(a) if str(a).startswith("$") else shlex.quote(str(a)) for a in args]
    return " ".join(words)


# --- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("model: a preset, or pretrain_gpt2.py / pretrain_bert.py's shape flags")
    group.add_argument("--model", help=f"preset: {', '.join(MODELS)}")
    group.add_argument("--model-type", default="gpt2", help="gpt2 or bert (with the shape flags)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--max-position-embeddings",
                 "--vocab-size", "--intermediate-size", "--max-preds-per-seq"):
        group.add_argument(flag, type=int, default=None)
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    group.add_argument("--hidden-dropout", type=float, default=None, help="dropout (masks cost memory); 0.1")
    group.add_argument("--global-batch-size", type=int, default=None, help="default: the preset's, else 512")
    group = parser.add_argument_group("cluster: a preset, or its numbers (which also override a preset's)")
    group.add_argument("--cluster", help=f"preset: {', '.join(CLUSTERS)}")
    group.add_argument("--gpus", type=int, default=None, help="GPUs to plan for")
    group.add_argument("--gpus-per-node", type=int, default=None)
    group.add_argument("--gpu-memory-gb", type=float, default=None, help="GiB per GPU")
    group.add_argument("--peak-tflops", type=float, default=None, help="dense peak per GPU at the precision")
    group.add_argument("--memory-bandwidth-gbps", type=float, default=None, help="GPU memory, GB/s")
    group.add_argument("--intra-node-gbps", type=float, default=None, help="per GPU within a node, GB/s")
    group.add_argument("--inter-node-gbps", type=float, default=None, help="a node's network cards together, GB/s")
    group.add_argument("--fp16", action="store_true", help="precision (default: fp16 on V100, bf16 elsewhere)")
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp32", action="store_true")
    parser.add_argument("--top", type=int, default=10, help="layouts to list")
    parser.add_argument("--validate", action="store_true", help="published vs predicted; exit 1 past the tolerance")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine and plan for it")
    return parser.parse_args(argv)


SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


def spec_from_args(args: argparse.Namespace) -> tuple[ModelSpec, int]:
    """The model and the global batch from a preset (flags override its fields) or the shape flags."""
    if args.model is not None:
        if args.model not in MODELS:
            raise ArgumentError(f"--model {args.model}: unknown preset; choose one of {', '.join(MODELS)}")
        spec, batch = MODELS[args.model]
    else:
        missing = [f"--{name.replace('_', '-')}" for name in SHAPE if getattr(args, name) is None]
        if missing:
            raise ArgumentError(f"give --model PRESET ({', '.join(MODELS)}) or the shape flags; missing "
                                f"{' '.join(missing)}")
        if args.model_type not in ("gpt2", "bert"):
            raise ArgumentError(f"--model-type {args.model_type}: choose gpt2 or bert")
        bert = args.model_type == "bert"
        spec = ModelSpec(args.model_type, args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length,
                         30522 if bert else 50257, args.seq_length, max_preds_per_seq=80 if bert else 0)
        batch = 512
    overrides = {field: value for field, value in (
        ("max_position_embeddings", args.max_position_embeddings), ("vocab_size", args.vocab_size),
        ("intermediate_size", args.intermediate_size), ("max_preds_per_seq", args.max_preds_per_seq),
        ("divisible_by", args.make_vocab_size_divisible_by), ("dropout", args.hidden_dropout),
        *((name, getattr(args, name)) for name in SHAPE)) if value is not None}
    spec = dataclasses.replace(spec, **overrides)
    check_shape(spec)
    batch = args.global_batch_size or batch
    if batch < 1:
        raise ArgumentError(f"--global-batch-size {batch}: give a positive number of sequences")
    return spec, batch


def cluster_from_args(args: argparse.Namespace) -> Cluster:
    if args.gpus is None or args.gpus < 1:
        raise ArgumentError("--gpus N: give the number of GPUs to plan for")
    if args.calibrate:
        cluster = measured_cluster(args.gpus)
    elif args.cluster is not None:
        if args.cluster not in CLUSTERS:
            raise ArgumentError(f"--cluster {args.cluster}: unknown preset; choose one of {', '.join(CLUSTERS)}")
        cluster = CLUSTERS[args.cluster]
    else:
        numbers = ("gpus_per_node", "gpu_memory_gb", "peak_tflops", "memory_bandwidth_gbps", "intra_node_gbps",
                   "inter_node_gbps")
        missing = [f"--{name.replace('_', '-')}" for name in numbers if getattr(args, name) is None]
        if missing:
            raise ArgumentError(f"give --cluster PRESET ({', '.join(CLUSTERS)}) or the cluster's numbers; missing "
                                f"{' '.join(missing)}")
        cluster = Cluster("custom", 1, 1, 1, 1, 1, 1)
    overrides = {field: value for field, value in (
        ("gpus_per_node", args.gpus_per_node), ("memory_gib", args.gpu_memory_gb), ("peak_tflops", args.peak_tflops),
        ("hbm_gbps", args.memory_bandwidth_gbps), ("intra_gbps", args.intra_node_gbps),
        ("node_gbps", args.inter_node_gbps)) if value is not None}
    if any(value <= 0 for value in overrides.values()):
        raise ArgumentError("the cluster's numbers must be positive")
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32" if args.fp32 else cluster.precision
    cluster = dataclasses.replace(cluster, precision=precision, **overrides)
    if args.gpus > cluster.gpus_per_node and args.gpus % cluster.gpus_per_node:
        raise ArgumentError(f"--gpus {args.gpus} is not a whole number of {cluster.gpus_per_node}-GPU nodes")
    return cluster


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.validate:
        lines, ok = validate()
        print("\n".join(lines))
        if not ok:
            sys.exit(1)
        return
    spec, batch = spec_from_args(args)
    cluster = cluster_from_args(args)
    estimates = plan(spec, cluster, args.gpus, batch)
    fitting = sum(est.fits for est in estimates)
    if not fitting:
        lightest = min(estimates, key=lambda est: est.memory["total"])
        raise ArgumentError(f"no layout fits in {cluster.memory_gib:g} GiB per GPU: the lightest, "
                            f"{describe(lightest.layout, spec)}, needs {lightest.memory['total'] / GIB:.1f} GiB; "
                            "use more GPUs or GPUs with more memory")
    print(f"{spec.kind} {spec.num_layers} x {spec.hidden_size}, {spec.num_attention_heads} heads, seq "
          f"{spec.seq_length}, global batch {batch} on {args.gpus} x {cluster.name} ({cluster.memory_gib:.4g} GiB, "
          f"{cluster.peak_tflops:.4g} TFLOP/s {cluster.precision}): {fitting} of {len(estimates)} layouts fit")
    print("\n".join(format_estimates(estimates, spec, batch, args.top)))
    print("\nbest layout (add the data and tokenizer flags: --data-path or --train-data, --vocab-file ...):\n"
          + launch_command(spec, cluster, estimates[0].layout, batch))


if __name__ == "__main__":
    run_main(main)
