"""Where a run's time and memory go: per-phase timers, model FLOPs, the device's peak, MFU and memory.

``Timers`` is Megatron's: ``timers("forward").start()`` / ``.stop()``, read per log interval. A timer
synchronises the device only when the run asks for timings (``--log-timers``), so the default path
stays asynchronous on CUDA; disabled timers cost nothing.

Model FLOPs per token, forward and backward (activation recomputation is not useful work and is not
counted): ``6 * N`` for the weights, with ``N`` every parameter of a matrix multiply (the transformer
layers and the output projection onto the vocabulary; not the embedding lookups, biases or LayerNorms),
plus ``12 * L * s * h`` for the attention scores and their weighted sum. MFU is the achieved model
TFLOP/s per device divided by the device's dense peak for the run's precision: ``--peak-tflops``, else
a table of common GPUs by name, else (CPU) a short matrix multiply measured once.
``measure_allreduce_gbps`` measures the all-reduce bandwidth between fresh processes (tools/plan.py's
``--calibrate``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import resource
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

import mpu

# Dense peak TFLOP/s by (name fragment, precision): vendors' datasheets, without sparsity. fp32 is the
# plain (non-tensor-core) rate: a run that does not enable TF32 gets this one.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


class _Timer:
    def __init__(self, enabled: bool, synchronize) -> None:
        self.enabled, self.synchronize = enabled, synchronize
        self.elapsed = 0.0
        self.count = 0
        self._start: float | None = None

    def start(self) -> None:
        if self.enabled:
            self.synchronize()
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.enabled and self._start is not None:
            self.synchronize()
            self.elapsed += time.perf_counter() - self._start
            self.count += 1
            self._start = None


class Timers:
    """Named phase timers; ``timers(name)`` creates one on first use. Disabled: every call is a no-op."""

    def __init__(self, enabled: bool, device: torch.device | None = None) -> None:
        self.enabled = enabled
        cuda = device is not None and device.type == "cuda"
        self._synchronize = torch.cuda.synchronize if cuda else (lambda: None)
        self._timers: dict[str, _Timer] = {}

    def __call__(self, name: str) -> _Timer:
        if name not in self._timers:
            self._timers[name] = _Timer(self.enabled, self._synchronize)
        return self._timers[name]

    def milliseconds_per_iteration(self, iterations: int, reset: bool = True) -> dict[str, float]:
        """``{time_<name>_ms: ms per iteration}`` over the last ``iterations``, then (by default) reset."""
        if not self.enabled:
            return {}
        out = {f"time_{name}_ms": 1000.0 * t.elapsed / max(1, iterations) for name, t in self._timers.items()}
        if reset:
            for timer in self._timers.values():
                timer.elapsed, timer.count = 0.0, 0
        return out


def model_flops_per_token(config: Any, seq_length: int) -> float:
    """Forward + backward model FLOPs per token of a transformer config (see the module docstring)."""
    h, layers = config.hidden_size, config.num_layers
    ffn = config.intermediate_size or 4 * h
    per_layer = 4 * h * h + 2 * h * ffn  # QKV + output projection, and the MLP's two matrices
    weights = layers * per_layer + config.vocab_size * h
    return 6.0 * weights + 12.0 * layers * seq_length * h


PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def precision_name(dtype: torch.dtype) -> str:
    """``fp16``, ``bf16`` or ``fp32``: the key of the peak tables for a run whose parameters are ``dtype``."""
    return PRECISION_NAMES[dtype]


_MEASURED: dict[tuple[str, str], float] = {}


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """TFLOP/s of a square matrix multiply on this CPU (or the current CUDA device), best of a short run."""
    device = torch.device("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def _allreduce_rank(rank: int, world: int, port: int, backend: str, results) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        synchronize = (lambda: torch.cuda.synchronize(device)) if backend == "nccl" else (lambda: None)
        tensor = torch.ones(2**24, device=device)  # 64 MB
        dist.all_reduce(tensor)  # warm-up
        best = float("inf")
        for _ in range(3):
            synchronize()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            synchronize()
            best = min(best, time.perf_counter() - start)
        if rank == 0:
            results.put(2 * (world - 1) / world * tensor.numel() * 4 / best / 1e9)
    finally:
        dist.destroy_process_group()


def measure_allreduce_gbps(world: int = 2, timeout: float = 120.0) -> float:
    """Bus bandwidth (GB/s, ring all-reduce) of a 64-MB all-reduce between ``world`` fresh processes on this
    machine: NCCL when it has that many GPUs, gloo on CPU otherwise."""
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    ctx = multiprocessing.get_context("spawn")  # fresh processes: forking a process with threads may hang
    results = ctx.Queue()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_allreduce_rank, args=(r, world, port, backend, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"the {backend} all-reduce between {world} processes gave no result") from None
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def peak_tflops(device: torch.device, precision: str, explicit: float | None = None) -> tuple[float | None, str]:
    """(dense peak TFLOP/s per device, where it came from): the flag, the GPU table (None for a GPU it
    does not list), or on CPU a measured matrix multiply."""
    if explicit:
        return explicit, "--peak-tflops"
    if device.type == "cuda":  # a GPU not in the table gets no MFU rather than one against a rough measurement
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAK_TFLOPS:
            if fragment in name and precision in peaks:
                return peaks[precision], f"{fragment} {precision} datasheet"
        return None, ""
    key = (str(device), precision)
    if key not in _MEASURED:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if device.type == "cpu" and precision == "fp16":
            dtype = torch.float32  # CPU fp16 matmuls are emulated: the fp32 rate is the honest ceiling
        _MEASURED[key] = measure_matmul_tflops(dtype)
    return _MEASURED[key], f"a {precision} matrix multiply measured on this {device.type}"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory so far: allocated and reserved on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}


def training_state_bytes(model: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds for the weights, their gradients (the model's, and fp32 master gradients where
    they are separate) and the optimizer state (``optimizer.state_bytes()``: fp32 masters and Adam's
    moments, a data-parallel shard of them under ``--use-distributed-optimizer``)."""
    params = list(model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    masters = [m for g in optimizer.param_groups for m in g["params"]]
    grads += sum(m.grad.numel() * m.grad.element_size() for m in masters
                 if m.grad is not None and all(m is not p for p in params))
    return {"parameters": sum(p.numel() * p.element_size() for p in params), "gradients": grads,
            "optimizer state": optimizer.state_bytes()}


class SavedActivationMeter:
    """The bytes of distinct storages autograd keeps for backward while the meter is entered: the
    activations, which grow with the batch and the sequence. ``live`` now, ``peak`` the most at any
    time. Storages of ``parameters`` (weights a layer saves for its backward: the same whatever the
    batch or the parallel layout) are left out. CPU has no allocator statistics; this counts what the
    memory of a training step is made of, on any device."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self.refs: dict[tuple[int, int], int] = {}
        self.live = self.peak = 0
        self.ignored = {p.untyped_storage().data_ptr() for p in parameters}

    def __enter__(self) -> SavedActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.ignored:
            return _Held(None, None, tensor)
        key = (storage.data_ptr(), storage.nbytes())
        if not self.refs.get(key):
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(self, key, tensor)

    def release(self, key: tuple[int, int]) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= key[1]


class _Held:
    """What autograd holds instead of a saved tensor; its end is the tensor's release."""

    def __init__(self, owner: SavedActivationMeter | None, key: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        if self.owner is not None:
            self.owner.release(self.key)


@dataclasses.dataclass
class Performance:
    """What a run's log lines need to report its speed: timers, model FLOPs per token and the peak for MFU."""

    timers: Timers
    device: torch.device
    flops_per_token: float
    peak_tflops: float | None
    peak_source: str = ""

    @classmethod
    def for_run(cls, config: Any, seq_length: int, device: torch.device, precision: str, log_timers: bool = False,
                explicit_peak: float | None = None) -> Performance:
        """Timers (enabled by ``log_timers``), the FLOPs of ``config`` at ``seq_length`` and the peak
        for MFU: ``explicit_peak`` (``--peak-tflops``), the GPU table on CUDA, or measured on CPU
        when timing; rank 0 prints which."""
        flops = model_flops_per_token(config, seq_length) if config is not None else 0.0
        peak, source = None, ""
        if explicit_peak or device.type == "cuda" or log_timers:
            peak, source = peak_tflops(device, precision, explicit_peak)
        if peak is not None and mpu.is_rank_0():
            rate = f"{peak:.1f} TFLOP/s" if peak >= 1 else f"{peak * 1e3:.1f} GFLOP/s"  # a slow CPU: not 0.0
            print(f" > MFU against {rate} per device ({source}); model FLOPs per token "
                  f"{flops / 1e6:.1f}M (6N + 12Lsh)", flush=True)
        return cls(Timers(log_timers, device), device, flops, peak, source)
