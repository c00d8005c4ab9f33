"""The capacity planner's model: which layouts fit a model on N GPUs, and how fast each should run.

``tools/plan.py`` is its command line (flags, presets, the printed table and launch command, ``--calibrate``,
``--validate``); this module holds the estimates, the model and cluster presets, the layouts tried and the
published rows they are checked against.


Every layout the toolkit runs is tried: tensor parallel ``T`` (within a node, splitting the heads), pipeline
``P`` (splitting the layers) with ``v`` virtual stages per GPU (``--num-layers-per-virtual-pipeline-stage``,
which needs the micro-batches per step to divide by ``P``), data parallel ``D = N / (T P)``, the micro-batch,
activation checkpointing, ``--use-distributed-optimizer`` and ``--sequence-parallel``. Each is ranked by its
step time among those that fit; the best is printed as the command that launches it.

Memory per GPU, on the heavier of the first and the last pipeline stage:

* weights, gradients, optimizer state: counted from the model itself, built on the meta device at
  tensor-parallel size 1 with the vocabulary padded for ``T``; a parameter its layer tags as partitioned
  holds ``1/T`` of its elements on each rank. The first stage holds the embeddings, the last the final
  LayerNorm (BERT: its heads) and, for ``P > 1``, a copy of the tied word embeddings. Bytes as this
  toolkit holds them after a step: half-precision weights and gradients plus fp32 master gradients,
  masters and Adam's two moments and one step count per tensor (fp32: the weights are the masters),
  a contiguous ``1/D`` share of them under the distributed optimizer (``fp16/distributed_optimizer.py``).
* activations: Korthikanti et al. 2022's count as this toolkit's layers keep them for backward, per layer
  and micro-batch with ``e`` bytes per element: ``s b h (4 e + 2 m) / t_sp + s b h 12 e (f / 4h) / t``
  (``m`` one byte per dropout mask, ``t_sp = t`` with sequence parallelism), i.e. ``34 s b h / t``
  in half precision with sequence parallelism, plus the attention scores, which a fused (flash) kernel
  recomputes instead of keeping and the unfused CPU path keeps as ``(3 e + 1) a s^2 b / t``. With
  checkpointing each layer keeps only its input and one layer is recomputed at a time. The first
  stage of a 1F1B pipeline holds ``P`` micro-batches, ``P + (P - 1) / v`` with ``v`` virtual stages.
  Embeddings and the output layer (logits and their fp32 softmax) are counted too.
* temporary buffers: the largest transient: the gradient all-reduce's flattened copy of all gradients
  (the distributed optimizer's flat fp32 gradients, its shard and the gathered weights), or the logits'
  fp32 gradient.

Time per step (one global batch), per GPU:

* compute: each layer's four GEMMs and attention at ``E * peak * k / (k + 128)`` (``k`` the GEMM's
  smaller inner or outer width per GPU: thin per-GPU matrices, e.g. ``h / T``, run worse), three times the
  forward for forward + backward, four with recomputation; the elementwise work (LayerNorm, bias, GELU,
  dropout, residual) and the Adam step at 80% of the memory bandwidth.
* tensor-parallel communication: the ring all-reduces (all-gathers and reduce-scatters with sequence
  parallelism) of ``s b h`` activations, four per layer and micro-batch, six with recomputation.
* pipeline: the bubble ``(P - 1) / v`` micro-batch times, plus the point-to-point sends: as this toolkit
  sends them (``mpu/p2p.py``), every tensor-parallel rank sends the stage's whole ``b s h`` hidden state
  (``b s h / T``, its slice, with sequence parallelism; not Megatron's scatter / gather of ``1 / T`` each),
  behind a 48-byte shape header.
* data-parallel reduction: a ring all-reduce of the gradients after backward (not overlapped), through the
  node's network cards shared by the rings crossing each node; fp32 reduce-scatter and all-gather with the
  distributed optimizer.

Constants: links reach 80% of their bandwidth with 10 us per ring step, memory-bound kernels 80% of the
memory bandwidth; ``E``, the fraction of the dense peak big GEMMs reach, is the one fitted number: calibrated
on the published 1.7B row (32 A100s, 137 TFLOP/s per GPU) and then used for every other row and cluster
(``--validate`` refits and prints it). TFLOP/s are counted as the published rows count them: the model's
FLOPs plus the recomputed forward (Narayanan et al. 2021's ``96 B s l h^2 (1 + s / 6h + V / 16 l h)``).

Limits: the time model does not know kernels' launch overhead or stragglers, does not overlap the
data-parallel reduction with backward (``--overlap-grad-reduce``), assumes the other pipeline stages as
slow as the slowest and fused attention on GPUs; the memory model leaves out the CUDA context, NCCL's
buffers and fragmentation (a layout fits in 92% of the GPU's memory) and counts pipeline stages from
the layers of the non-pipelined model (the order of a stage's tensors, which moves the distributed
optimizer's shard borders by a few elements, is assumed).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator

import torch

from conversion.layout import build_model, model_parallel_of_one
from errors import ArgumentError
from model import TransformerConfig, bert_config, optimizer_param_groups, pad_vocab_size
from performance import GPU_PEAK_TFLOPS, model_flops_per_token

GIB = 2**30
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
FIRST, LAST = -1, -2  # where a parameter lives that is not in a transformer layer
USABLE_MEMORY = 0.92  # the rest: CUDA context, NCCL buffers, fragmentation
MICRO_BATCHES = (1, 2, 4, 8, 16)
P2P_HEADER_BYTES = 6 * 8  # mpu/p2p.py's header before each pipeline message: six int64s


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model's shape as pretrain_gpt2.py / pretrain_bert.py take it (the vocabulary unpadded)."""

    kind: str  # "gpt2" or "bert"
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    max_position_embeddings: int
    divisible_by: int = 128
    intermediate_size: int | None = None
    dropout: float = 0.1
    max_preds_per_seq: int = 0  # BERT's predicted positions per sequence (the LM head runs on those only)

    @property
    def ffn(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def padded_vocab(self, tp: int) -> int:
        return pad_vocab_size(self.vocab_size, self.divisible_by, tp)

    def config(self, tp: int) -> TransformerConfig:
        """The model's config at tensor-parallel size ``tp`` (the vocabulary padded by the one rule)."""
        fields = dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                      num_attention_heads=self.num_attention_heads,
                      vocab_size=self.padded_vocab(tp),
                      max_sequence_length=self.max_position_embeddings, intermediate_size=self.intermediate_size,
                      unpadded_vocab_size=self.vocab_size, hidden_dropout=self.dropout,
                      attention_dropout=self.dropout)
        return bert_config(**fields) if self.kind == "bert" else TransformerConfig(**fields)


MODELS = {  # name: (spec, default global batch)
    "gpt2-345m": (ModelSpec("gpt2", 24, 1024, 16, 1024, 50257, 1024), 512),
    "gpt2-8.3b": (ModelSpec("gpt2", 72, 3072, 32, 1024, 50257, 1024), 512),
    "bert-large": (ModelSpec("bert", 24, 1024, 16, 512, 30522, 512, max_preds_per_seq=80), 1024),
    "gpt3-175b": (ModelSpec("gpt2", 96, 12288, 96, 2048, 51200, 2048), 1536),
}


def _datasheet_peak(gpu: str, precision: str) -> float:
    return next(peaks[precision] for name, peaks in GPU_PEAK_TFLOPS if name == gpu)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """GPUs and their links. Bandwidths in GB/s, one direction: ``intra_gbps`` per GPU within a node,
    ``node_gbps`` the node's network cards together."""

    name: str
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float
    hbm_gbps: float
    intra_gbps: float
    node_gbps: float
    precision: str = "bf16"
    fused_attention: bool = True  # flash attention: the scores are recomputed, never kept
    gemm_efficiency: float | None = None  # measured machines: their GEMM rate is the achieved one


CLUSTERS = {  # vendors' datasheets: DGX-2H (NVSwitch, 8 x 100 Gb/s), DGX A100/H100/H200 (8 x 200/400 Gb/s)
    "v100-dgx2": Cluster("v100-dgx2", 16, 32, _datasheet_peak("V100", "fp16"), 900, 150, 100, "fp16"),
    "a100-dgx": Cluster("a100-dgx", 8, 80, _datasheet_peak("A100", "bf16"), 2039, 300, 200),
    "h100-dgx": Cluster("h100-dgx", 8, 80, _datasheet_peak("H100", "bf16"), 3350, 450, 400),
    "h200-dgx": Cluster("h200-dgx", 8, 141, _datasheet_peak("H200", "bf16"), 4800, 450, 400),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run: tensor, pipeline (``virtual`` model chunks per GPU) and data-parallel sizes, the rest."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    virtual: int = 1
    checkpoint: bool = False
    distributed_optimizer: bool = False
    sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class TimeConstants:
    """The time model's constants; ``gemm_efficiency`` is fitted (``fit_gemm_efficiency``), the rest fixed."""

    gemm_efficiency: float = 0.8108  # fitted on CALIBRATION_ROW; --validate refits it
    tile: int = 128
    hbm_efficiency: float = 0.8
    link_efficiency: float = 0.8
    latency_s: float = 10e-6


# --- memory -------------------------------------------------------------------------------------------------------


@functools.cache
def parameter_table(spec: ModelSpec, tp: int, build_layers: int = 1) -> tuple[tuple[tuple[int, int], ...], int]:
    """``((where, elements on one tensor-parallel rank), ...)`` of every parameter in the optimizer's order
    (``where``: the layer's index, ``FIRST`` or ``LAST``), and the word embedding's elements per rank.

    The model is built with ``build_layers`` layers (0 for all) and its layers' rows repeated for the rest:
    every layer holds the same tensors, and the optimizer orders each decay group module by module."""
    layers = build_layers or spec.num_layers
    with model_parallel_of_one():
        model = build_model(spec.kind, dataclasses.replace(spec.config(tp), num_layers=layers))
    where = {id(p): i for i, layer in enumerate(model.transformer.layers) for p in layer.parameters()}
    first = model.embeddings if spec.kind == "bert" else torch.nn.ModuleList(
        [model.word_embeddings, model.position_embeddings])
    where.update({id(p): FIRST for p in first.parameters()})
    word = model.embeddings.word_embeddings.weight if spec.kind == "bert" else model.word_embeddings.weight
    rows: list[tuple[int, int]] = []
    for group in optimizer_param_groups(model):
        placed = [(where.get(id(p), LAST), p.numel() // tp if getattr(p, "model_parallel", False) else p.numel())
                  for _, p in group]
        in_layers = [i for i, (w, _) in enumerate(placed) if w >= 0]
        start, end = (in_layers[0], in_layers[-1] + 1) if in_layers else (len(placed), len(placed))
        middle = placed[start:end]
        if build_layers:
            middle = [(i, n) for i in range(spec.num_layers) for w, n in middle if w == 0]
        rows += placed[:start] + middle + placed[end:]
    return tuple(rows), word.numel() // tp


@functools.cache
def stage_parameters(spec: ModelSpec, tp: int, pp: int, stage: int) -> tuple[int, ...]:
    """Elements per parameter tensor on one tensor-parallel rank of pipeline ``stage``, in optimizer order."""
    table, word = parameter_table(spec, tp)
    per = spec.num_layers // pp
    rows = [n for where, n in table
            if (where == FIRST and stage == 0) or (where == LAST and stage == pp - 1)
            or stage * per <= where < (stage + 1) * per]
    return tuple(rows + [word] * (pp > 1 and stage == pp - 1))  # the last stage's copy of the tied embeddings


def state_bytes(rows: tuple[int, ...], precision: str, dp: int = 1, sharded: bool = False,
                dp_rank: int = 0) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on one rank (``performance.training_state_bytes``'s
    keys) holding tensors of ``rows`` elements, with AdamW as this toolkit steps it."""
    e, n = BYTES[precision], sum(rows)
    masters = 4 if e < 4 else 0  # fp32 weights are their own masters
    if not sharded:
        return {"parameters": n * e, "gradients": n * e + masters * n,
                "optimizer state": (masters + 8) * n + 4 * len(rows)}
    shard = -(-n // dp)
    first, last = dp_rank * shard, min((dp_rank + 1) * shard, n)
    owned = max(0, last - first)
    ends = _cumulative(rows)
    pieces = bisect.bisect_left(ends, last) - bisect.bisect_right(ends, first) + 1 if owned else 0
    return {"parameters": n * e, "gradients": n * e + 4 * owned,  # the shard's master gradients are fp32 always
            "optimizer state": (masters + 8) * owned + 4 * pieces}


@functools.cache
def _cumulative(rows: tuple[int, ...]) -> list[int]:
    ends, total = [], 0
    for n in rows:
        total += n
        ends.append(total)
    return ends


def layer_activation_bytes(spec: ModelSpec, layout: Layout, e: int, fused_attention: bool) -> float:
    """What one layer keeps for backward for one micro-batch (see the module docstring)."""
    s, b, h, a, t = spec.seq_length, layout.micro_batch, spec.hidden_size, spec.num_attention_heads, layout.tp
    mask = 1 if spec.dropout > 0 else 0
    replicated = s * b * h * (4 * e + 2 * mask) / (t if layout.sequence_parallel else 1)
    split = s * b * (4 * h + 2 * spec.ffn) * e / t  # Q, K, V, the context; the MLP's two f-wide activations
    scores = 4 * a * s * b / t if fused_attention else (3 * e + 1) * a * s * s * b / t  # logsumexp, or the scores
    return replicated + split + scores


def activation_bytes(spec: ModelSpec, layout: Layout, stage: int, micro_batches: int, e: int,
                     fused_attention: bool) -> float:
    """Peak bytes kept for backward on pipeline ``stage`` (the layers' in-flight micro-batches, embeddings, head)."""
    s, b, h, t, p, v = spec.seq_length, layout.micro_batch, spec.hidden_size, layout.tp, layout.pp, layout.virtual
    sp = t if layout.sequence_parallel else 1
    mask = 1 if spec.dropout > 0 else 0
    per_stage = spec.num_layers // p
    if v > 1:  # interleaved 1F1B: warm-up chunks of L / (P v) layers each
        in_flight = min(2 * (p - stage - 1) + (v - 1) * p + 1, micro_batches * v) / v
    else:
        in_flight = min(p - stage, micro_batches)
    layer = layer_activation_bytes(spec, layout, e, fused_attention)
    layer_input = s * b * h * e / sp
    head = 0.0
    if stage == p - 1:
        vocab = spec.padded_vocab(t) / t
        rows = b * (spec.max_preds_per_seq or s)  # BERT's LM head sees only the predicted positions
        head = s * b * h * e / sp + rows * h * e * (3 if spec.kind == "bert" else 1) + rows * vocab * 4 + 9 * rows
    embed = s * b * (16 + (8 if spec.kind == "bert" else 0) + h * (mask + (e if spec.kind == "bert" else 0)) / sp)
    embed *= math.ceil(in_flight) if stage == 0 else 0
    if layout.checkpoint:
        return in_flight * per_stage * layer_input + max(head, layer - layer_input) + embed
    return in_flight * per_stage * layer + head + embed


def memory(spec: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int) -> tuple[int, dict[str, float]]:
    """(stage, bytes by kind) of the heavier of the first and last pipeline stage."""
    e = BYTES[cluster.precision]
    micro_batches = global_batch // (layout.dp * layout.micro_batch)
    heaviest: tuple[int, dict[str, float]] = (0, {})
    for stage in sorted({0, layout.pp - 1}):
        rows = stage_parameters(spec, layout.tp, layout.pp, stage)
        held = state_bytes(rows, cluster.precision, layout.dp, layout.distributed_optimizer)
        parts = {"weights": held["parameters"], "gradients": held["gradients"],
                 "optimizer": held["optimizer state"],
                 "activations": activation_bytes(spec, layout, stage, micro_batches, e, cluster.fused_attention),
                 "temporary": temporary_bytes(spec, layout, stage, sum(rows), e)}
        parts["total"] = sum(parts.values())
        if parts["total"] > heaviest[1].get("total", -1):
            heaviest = (stage, parts)
    return heaviest


def temporary_bytes(spec: ModelSpec, layout: Layout, stage: int, n: int, e: int) -> float:
    """The largest transient buffer of a step on one rank."""
    if layout.distributed_optimizer:
        shard = -(-n // layout.dp)
        reduction = 4 * shard * (layout.dp + 1)  # flat fp32 gradients and the shard; the same to all-gather
    else:
        reduction = n * e if layout.dp > 1 else 0  # every bucket flattened at once
    logits = 0.0
    if stage == layout.pp - 1:
        rows = layout.micro_batch * (spec.max_preds_per_seq or spec.seq_length)
        logits = rows * spec.padded_vocab(layout.tp) / layout.tp * (4 + e)
    return max(reduction, logits)


# --- time ---------------------------------------------------------------------------------------------------------


def _gemm_s(flops: float, k: int, cluster: Cluster, c: TimeConstants) -> float:
    efficiency = cluster.gemm_efficiency or c.gemm_efficiency
    return flops / (cluster.peak_tflops * 1e12 * efficiency * k / (k + c.tile))


def _ring_s(nbytes: float, ranks: int, gbps: float, c: TimeConstants, steps_per_rank: int = 2) -> float:
    """A ring all-reduce (``steps_per_rank`` 2) or all-gather / reduce-scatter (1) of ``nbytes``."""
    if ranks <= 1:
        return 0.0
    steps = steps_per_rank * (ranks - 1)
    return steps / ranks * nbytes / (gbps * 1e9 * c.link_efficiency) + steps * c.latency_s


def micro_batch_seconds(spec: ModelSpec, cluster: Cluster, layout: Layout, stage: int,
                        c: TimeConstants) -> tuple[float, float]:
    """(compute, tensor-parallel communication) of one micro-batch, forward and backward, on ``stage``."""
    s, b, h, t = spec.seq_length, layout.micro_batch, spec.hidden_size, layout.tp
    e, f, bs = BYTES[cluster.precision], spec.ffn, spec.seq_length * layout.micro_batch
    passes = 4 if layout.checkpoint else 3  # forward, backward (twice the forward), recomputed forward
    gemms = (_gemm_s(2 * bs * h * 3 * h / t, min(h, 3 * h // t), cluster, c)  # QKV
             + _gemm_s(2 * bs * h / t * h, min(h // t, h), cluster, c)  # attention output
             + _gemm_s(2 * bs * h * f / t, min(h, f // t), cluster, c) + _gemm_s(2 * bs * f / t * h, min(f // t, h),
                                                                                 cluster, c)
             + _gemm_s(4 * b * s * s * h / t, h // spec.num_attention_heads, cluster, c))  # attention
    sp = t if layout.sequence_parallel else 1
    # bytes read and written per forward: LayerNorms, bias + dropout + residual (replicated); QKV bias, attention's
    # inputs and output, bias + GELU (split); unfused attention also scales, softmaxes and drops out its scores
    elementwise = bs * h * (10 * e + 2) / sp + bs * (12 * e * h + 2 * e * f) / t
    if not cluster.fused_attention:
        elementwise += spec.num_attention_heads * s * bs * (4 * e + 1) / t
    hbm = cluster.hbm_gbps * 1e9 * c.hbm_efficiency
    layers = spec.num_layers // layout.pp
    compute = layers * passes * (gemms + elementwise / hbm)
    message = bs * h * e
    if layout.sequence_parallel:
        tp = layers * (10 + 4 * (passes - 3)) * _ring_s(message, t, cluster.intra_gbps, c, 1)
    else:
        tp = layers * (4 + 2 * (passes - 3)) * _ring_s(message, t, cluster.intra_gbps, c)
    if stage == layout.pp - 1:
        rows = b * (spec.max_preds_per_seq or s)
        vocab = spec.padded_vocab(t)
        compute += 3 * _gemm_s(2 * rows * h * vocab / t, min(h, vocab // t), cluster, c)
        compute += rows * vocab / t * 40 / hbm  # fp32 softmax and cross entropy, forward and backward
        tp += _ring_s(message, t, cluster.intra_gbps, c) + 3 * _ring_s(4 * rows, t, cluster.intra_gbps, c)
    if stage == 0:
        tp += _ring_s(message, t, cluster.intra_gbps, c)  # the vocabulary-parallel embedding's all-reduce
    return compute, tp


def step_seconds(spec: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
                 c: TimeConstants = TimeConstants()) -> dict[str, float]:
    """Seconds per step by part: compute (with the optimizer), tensor-parallel, pipeline, data-parallel."""
    m = global_batch // (layout.dp * layout.micro_batch)
    stages = sorted({0, layout.pp // 2, layout.pp - 1})
    compute, tp = max((micro_batch_seconds(spec, cluster, layout, s, c) for s in stages), key=sum)
    gpn, tp_pp = cluster.gpus_per_node, layout.tp * layout.pp
    e = BYTES[cluster.precision]
    p2p_gbps = cluster.intra_gbps if tp_pp <= gpn else cluster.node_gbps / gpn
    # schedules.py / mpu/p2p.py: every tensor-parallel rank sends the stage's whole (b, s, h) hidden state, its
    # (b, s/T, h) slice with sequence parallelism, each behind a shape header (two sends, no gather after)
    sp = layout.tp if layout.sequence_parallel else 1
    payload = spec.seq_length * layout.micro_batch * spec.hidden_size * e / sp
    message = (P2P_HEADER_BYTES + payload) / (p2p_gbps * 1e9 * c.link_efficiency) + 2 * c.latency_s
    p2p = 0.0 if layout.pp == 1 else (m * layout.virtual + layout.pp - 1) * 2 * message
    bubble = (layout.pp - 1) / layout.virtual * (compute + tp) + p2p
    n = max(sum(stage_parameters(spec, layout.tp, layout.pp, s)) for s in {0, layout.pp - 1})
    dp_gbps = cluster.intra_gbps if tp_pp * layout.dp <= gpn else cluster.node_gbps / min(gpn, tp_pp)
    if layout.distributed_optimizer:
        reduction = 2 * _ring_s(4 * n, layout.dp, dp_gbps, c, 1)
        optimizer = -(-n // layout.dp) * 40 + n * (4 + e)
    else:  # --overlap-grad-reduce: buckets of 2^24 elements reduce during the last micro-batch's backward
        buckets = math.ceil(n / 2**24)
        reduction = _ring_s(n * e, layout.dp, dp_gbps, c) + (buckets - 1) * 2 * (layout.dp - 1) * c.latency_s
        backward = compute * (1 - 1 / (4 if layout.checkpoint else 3))
        reduction = max(reduction / buckets, reduction - backward)
        optimizer = n * 40
    if layout.pp > 1:  # the tied word embeddings of the first and last stage
        word = parameter_table(spec, layout.tp)[1]
        reduction += _ring_s(word * e, 2, cluster.node_gbps / gpn, c)
    return {"compute": m * compute + optimizer / (cluster.hbm_gbps * 1e9 * c.hbm_efficiency), "tensor": m * tp,
            "pipeline": bubble, "data": reduction}


def hardware_flops_per_step(spec: ModelSpec, tp: int, global_batch: int, checkpoint: bool) -> float:
    """Model FLOPs of a step plus the recomputed forward (the published rows' convention)."""
    config = spec.config(tp)
    model = model_flops_per_token(config, spec.seq_length)
    layers = model - 6.0 * config.vocab_size * config.hidden_size
    return global_batch * spec.seq_length * (model + (layers / 3 if checkpoint else 0.0))


# --- search -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Estimate:
    layout: Layout
    stage: int
    memory: dict[str, float]
    seconds: dict[str, float]
    fits: bool

    @property
    def step(self) -> float:
        return sum(self.seconds.values())


def check_shape(spec: ModelSpec) -> None:
    """One line for a shape no layout can build."""
    if spec.kind not in ("gpt2", "bert"):
        raise ArgumentError(f"--model-type {spec.kind}: choose gpt2 or bert")
    if min(spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.seq_length, spec.vocab_size) < 1:
        raise ArgumentError("the model's shape flags must all be positive")
    if spec.hidden_size % spec.num_attention_heads:
        raise ArgumentError(f"--hidden-size {spec.hidden_size} does not divide by --num-attention-heads "
                            f"{spec.num_attention_heads}; choose a multiple")
    if spec.seq_length > spec.max_position_embeddings:
        raise ArgumentError(f"--seq-length {spec.seq_length} exceeds --max-position-embeddings "
                            f"{spec.max_position_embeddings}")


def candidate_layouts(spec: ModelSpec, cluster: Cluster, gpus: int, global_batch: int) -> Iterator[Layout]:
    """Every layout the toolkit can run for this model on ``gpus`` GPUs at ``global_batch``."""
    for tp in (t for t in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % t == 0):
        if gpus % tp or spec.num_attention_heads % tp or spec.ffn % tp:
            continue
        for pp in (p for p in range(1, spec.num_layers + 1) if spec.num_layers % p == 0 and gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            for micro in (b for b in MICRO_BATCHES if global_batch % (dp * b) == 0):
                m = global_batch // (dp * micro)
                per_stage = spec.num_layers // pp
                virtuals = [1] + [v for v in range(2, per_stage + 1) if pp > 1 and per_stage % v == 0 and m % pp == 0]
                splits = (False, True) if tp > 1 and spec.seq_length % tp == 0 else (False,)
                for v, checkpoint, sharded, sp in itertools.product(virtuals, (False, True), (False, True), splits):
                    yield Layout(tp, pp, dp, micro, v, checkpoint, sharded, sp)


def estimate(spec: ModelSpec, cluster: Cluster, layout: Layout, global_batch: int,
             c: TimeConstants = TimeConstants()) -> Estimate:
    stage, parts = memory(spec, cluster, layout, global_batch)
    return Estimate(layout, stage, parts, step_seconds(spec, cluster, layout, global_batch, c),
                    parts["total"] <= USABLE_MEMORY * cluster.memory_gib * GIB)


def plan(spec: ModelSpec, cluster: Cluster, gpus: int, global_batch: int,
         c: TimeConstants = TimeConstants()) -> list[Estimate]:
    """Every candidate layout's estimate, those that fit first, each part fastest first."""
    check_shape(spec)
    estimates = [estimate(spec, cluster, layout, global_batch, c)
                 for layout in candidate_layouts(spec, cluster, gpus, global_batch)]
    if not estimates:
        raise ArgumentError(f"no layout splits this model on {gpus} GPUs at global batch {global_batch}: "
                            f"the GPU count, the batch and the heads/layers need common divisors")
    return sorted(estimates, key=lambda est: (not est.fits, est.step))


# --- the published rows -------------------------------------------------------------------------------------------

# Narayanan et al. 2021, Table 1: GPT models on 80-GB A100s (sequence 2048, vocabulary 51200, mixed precision,
# activation recomputation): (params, layers, hidden, heads, T, P, GPUs, global batch, TFLOP/s per GPU).
PUBLISHED = (
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137), ("3.6B", 30, 3072, 32, 2, 1, 64, 512, 138),
    ("7.5B", 36, 4096, 32, 4, 1, 128, 512, 142), ("18.4B", 40, 6144, 48, 8, 1, 256, 1024, 135),
    ("39.1B", 48, 8192, 64, 8, 2, 512, 1536, 138), ("76.1B", 60, 10240, 80, 8, 4, 1024, 1792, 140),
    ("145.6B", 80, 12288, 96, 8, 8, 1536, 2304, 148), ("310.1B", 96, 16384, 128, 8, 16, 1920, 2160, 155),
    ("529.6B", 105, 20480, 128, 8, 35, 2520, 2520, 163), ("1008.0B", 128, 25600, 160, 8, 64, 3072, 3072, 163),
)
CALIBRATION_ROW = 0  # the 1.7B row: one GPU's compute and the data-parallel reduction, nothing else
# The 2019 seed: 1.2B (40 x 1536, 16 heads) on one 32-GB V100 at 39 TFLOP/s, and 8.3B with 8-way model and
# 64-way data parallelism on 512 (DGX-2H) at 15.1 PFLOP/s: 76% weak scaling; batch 8 per replica, seq 1024.
SEED_BASELINE = (ModelSpec("gpt2", 40, 1536, 16, 1024, 51200, 1024), Layout(1, 1, 1, 8, checkpoint=True), 8, 39.0)
SEED_SCALED = (ModelSpec("gpt2", 72, 3072, 32, 1024, 51200, 1024), Layout(8, 1, 64, 8, checkpoint=True), 512, 15100.0)
SEED_EFFICIENCY = 0.76
ROW_TOLERANCE, EFFICIENCY_TOLERANCE = 0.15, 0.05


# The published runs materialised the attention scores (Megatron's fused softmax; no flash attention).
PUBLISHED_CLUSTER = dataclasses.replace(CLUSTERS["a100-dgx"], fused_attention=False)
SEED_CLUSTER = dataclasses.replace(CLUSTERS["v100-dgx2"], fused_attention=False)


def published_spec(row: tuple) -> ModelSpec:
    return ModelSpec("gpt2", row[1], row[2], row[3], 2048, 51200, 2048)


def tflops_per_gpu(spec: ModelSpec, layout: Layout, global_batch: int, seconds: float) -> float:
    gpus = layout.tp * layout.pp * layout.dp
    return hardware_flops_per_step(spec, layout.tp, global_batch, layout.checkpoint) / seconds / gpus / 1e12


def published_layout_estimate(row: tuple, c: TimeConstants) -> Estimate:
    """The row's T, P and D with recomputation; the fastest micro-batch and virtual stages (that fit, if any)."""
    spec, cluster, (tp, pp, gpus, batch) = published_spec(row), PUBLISHED_CLUSTER, row[4:8]
    options = [estimate(spec, cluster, layout, batch, c) for layout in candidate_layouts(spec, cluster, gpus, batch)
               if (layout.tp, layout.pp, layout.checkpoint) == (tp, pp, True)
               and not (layout.distributed_optimizer or layout.sequence_parallel)]
    return min(options, key=lambda est: (not est.fits, est.step))


def fit_gemm_efficiency(row: tuple = PUBLISHED[CALIBRATION_ROW]) -> float:
    """``E`` that makes the predicted TFLOP/s of ``row``'s layout equal the published figure (bisection)."""
    low, high = 0.05, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        est = published_layout_estimate(row, TimeConstants(gemm_efficiency=middle))
        if tflops_per_gpu(published_spec(row), est.layout, row[7], est.step) < row[8]:
            low = middle
        else:
            high = middle
    return round((low + high) / 2, 4)


@dataclasses.dataclass
class RowCheck:
    """One published row: the prediction for its layout, and the planner's own pick on its GPUs."""

    name: str
    layout: Layout
    published: float
    predicted: float
    pick: Layout
    pick_fits: bool
    pick_speedup: float  # the published layout's predicted step time over the pick's

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def check_rows(c: TimeConstants = TimeConstants()) -> list[RowCheck]:
    checks = []
    for row in PUBLISHED:
        spec, est = published_spec(row), published_layout_estimate(row, c)
        best = plan(spec, PUBLISHED_CLUSTER, row[6], row[7], c)[0]
        checks.append(RowCheck(row[0], est.layout, row[8], tflops_per_gpu(spec, est.layout, row[7], est.step),
                               best.layout, best.fits, est.step / best.step))
    return checks


def seed_scaling(c: TimeConstants = TimeConstants()) -> tuple[float, float]:
    """Predicted TFLOP/s per GPU of the seed's 1.2B on one V100 and of its 8.3B on 512."""
    rates = []
    for spec, layout, batch, _ in (SEED_BASELINE, SEED_SCALED):
        rates.append(tflops_per_gpu(spec, layout, batch, sum(step_seconds(spec, SEED_CLUSTER, layout, batch,
                                                                          c).values())))
    return rates[0], rates[1]
