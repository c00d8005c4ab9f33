"""Random-number streams for model parallelism, and activation checkpointing that replays them.

Two kinds of randomness exist in a tensor-parallel model:

* in **replicated** regions (e.g. dropout on the residual stream) every model-parallel rank must
  draw the same numbers, so those ops use the default generator, seeded identically everywhere;
* in **partitioned** regions (e.g. dropout on this rank's attention heads) each model-parallel
  rank must draw different numbers, while data-parallel replicas of the same rank draw the same.
  Those ops run inside ``get_cuda_rng_tracker().fork()``, which swaps in a per-rank stream.

The tracker works on CPU and CUDA: a tracked stream holds the CPU generator state and, when CUDA
is available, the current CUDA device's generator state, and ``fork`` swaps both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .initialize import get_model_parallel_rank

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"

RngState = dict[str, torch.Tensor]


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_device_rng_state() -> RngState:
    """The default generators' states: ``cpu`` always, ``cuda`` once CUDA is in use."""
    state = {"cpu": torch.get_rng_state()}
    if _cuda_ready():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_device_rng_state(state: RngState) -> None:
    """Restore states captured by ``get_device_rng_state``."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _cuda_ready():
        torch.cuda.set_rng_state(state["cuda"])


def _seeded_state(seed: int) -> RngState:
    """Generator states seeded with ``seed``, built without touching the default generators."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if _cuda_ready():
        state["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
    return state


class RNGStatesTracker:
    """Named random streams that can be swapped in around a region with ``fork``."""

    def __init__(self) -> None:
        self.states_: dict[str, RngState] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, RngState]:
        """A copy of every stream's state (for checkpoints and recomputation)."""
        return {name: {k: v.clone() for k, v in state.items()} for name, state in self.states_.items()}

    def set_states(self, states: dict[str, RngState]) -> None:
        self.states_ = {name: {k: v.clone() for k, v in state.items()} for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create the stream ``name`` seeded with ``seed``; names and seeds must be new."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the RNG tracker")
        self.seeds_.add(seed)
        self.states_[name] = _seeded_state(seed)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default stream resumes afterwards."""
        if name not in self.states_:
            raise KeyError(
                f"RNG state {name!r} is not in the tracker; call mpu.model_parallel_cuda_manual_seed first"
            )
        if _cuda_ready() and "cuda" not in self.states_[name]:
            # CUDA came up after the stream was seeded: derive its CUDA seed from the CPU state.
            cpu = torch.Generator()
            cpu.set_state(self.states_[name]["cpu"])
            cuda_seed = int(torch.randint(0, 2**62, (1,), generator=cpu).item())
            self.states_[name]["cuda"] = _seeded_state(cuda_seed)["cuda"]
        orig = get_device_rng_state()
        set_device_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = get_device_rng_state()
            set_device_rng_state(orig)


_RNG_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (name kept from Megatron; it tracks CPU streams too)."""
    return _RNG_TRACKER


get_rng_tracker = get_cuda_rng_tracker


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default streams with ``seed`` and the model-parallel stream per rank.

    The default generators (CPU and CUDA) get ``seed`` on every rank, so replicated regions and
    weight initialisation agree everywhere. The tracked ``model-parallel-rng`` stream gets
    ``seed + 2718 + model_parallel_rank``: different across model-parallel ranks, the same across
    data-parallel replicas.
    """
    model_parallel_seed = seed + 2718 + get_model_parallel_rank()
    torch.manual_seed(seed)
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, model_parallel_seed)


model_parallel_manual_seed = model_parallel_cuda_manual_seed


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]


class CheckpointFunction(torch.autograd.Function):
    """Run ``function`` without keeping activations; recompute it in backward.

    The recomputation restores the forward's CPU, CUDA and tracker RNG states (and autocast
    settings), so dropout masks and therefore gradients equal those of the plain forward.
    """

    @staticmethod
    def forward(ctx, run_function, *args):
        ctx.run_function = run_function
        ctx.rng_state = get_device_rng_state()
        ctx.tracker_state = _RNG_TRACKER.get_states()
        ctx.autocast = _autocast_state()
        ctx.tensor_indices = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.args = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_indices])
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("mpu.checkpoint works with .backward() only, not torch.autograd.grad()")
        args = list(ctx.args)
        for index, tensor in zip(ctx.tensor_indices, ctx.saved_tensors):
            args[index] = tensor.detach().requires_grad_(tensor.requires_grad)

        current_rng = get_device_rng_state()
        current_tracker = _RNG_TRACKER.get_states()
        set_device_rng_state(ctx.rng_state)
        _RNG_TRACKER.set_states(ctx.tracker_state)
        try:
            with contextlib.ExitStack() as stack:
                for device, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
                with torch.enable_grad():
                    outputs = ctx.run_function(*args)
        finally:
            set_device_rng_state(current_rng)
            _RNG_TRACKER.set_states(current_tracker)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [a.grad if torch.is_tensor(a) else None for a in args]
        return (None, *grads)


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Activation checkpointing that replays the model-parallel random streams."""
    return CheckpointFunction.apply(function, *args)
