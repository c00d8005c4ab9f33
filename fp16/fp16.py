"""Half-precision model wrapper and the optimizer wrapper that keeps fp32 master weights.

``FP16_Module`` runs a model in fp16 or bf16 (with optional fp32 islands); ``FP16_Optimizer``
wraps any torch optimizer so that it updates fp32 copies of the half parameters, unscales and
clips gradients, and skips a step on every rank when any rank's gradients overflowed. The same
wrapper serves fp32 training (no copies, scale 1), so the training loop has one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import mpu

from .loss_scaler import LossScaler


def _convert(value, dtype: torch.dtype):
    """Cast floating tensors (also inside tuples, lists and dicts) to ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, dtype) for k, v in value.items()}
    return value


def any_rank_overflowed(grad_norm: float, nonfinite_loss: bool = False) -> bool:
    """Whether any rank's gradient norm (or, with ``nonfinite_loss``, its loss) is not finite: every
    rank learns the same answer, so every rank skips the same steps."""
    flag = torch.tensor([0.0 if math.isfinite(grad_norm) and not nonfinite_loss else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(mpu.collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class FP16_Module(nn.Module):
    """Holds ``module`` in ``dtype`` (fp16 or bf16): floating inputs in, float outputs out (a pipeline
    stage before the last passes its hidden states on in ``dtype``).

    ``keep_fp32(name, submodule)`` names submodules to keep in fp32 (the seed's ``--fp32-embedding``,
    ``--fp32-layernorm``, ``--fp32-tokentypes``); the model casts at their borders.
    """

    def __init__(
        self,
        module: nn.Module,
        dtype: torch.dtype = torch.float16,
        keep_fp32: Callable[[str, nn.Module], bool] | None = None,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.module = module.to(dtype)
        if keep_fp32 is not None:
            for name, sub in module.named_modules():
                if keep_fp32(name, sub):
                    sub.float()

    def forward(self, *inputs, **kwargs):
        outputs = self.module(*_convert(inputs, self.dtype), **_convert(kwargs, self.dtype))
        if not mpu.is_pipeline_last_stage():
            return outputs  # hidden states for the next pipeline stage travel in half precision
        return _convert(outputs, torch.float32)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


class FP16_Optimizer:
    """Wraps ``optimizer`` with fp32 master weights, loss scaling and overflow skipping.

    Use ``backward(loss)`` instead of ``loss.backward()`` and ``step(max_norm)`` instead of
    clipping and stepping: it unscales the gradients into the masters, clips them with
    ``mpu.clip_grad_norm`` (the whole model-parallel model's norm), and steps unless some rank saw
    inf/nan, in which case every rank skips. Returns ``(grad_norm, skipped)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, loss_scaler: LossScaler | None = None) -> None:
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler or LossScaler(1.0)
        self.model_params: list[nn.Parameter] = []
        self.master_params: list[nn.Parameter] = []
        for group in optimizer.param_groups:
            masters = []
            for param in group["params"]:
                master = param
                if param.dtype != torch.float32:
                    master = nn.Parameter(param.detach().float().clone())
                    mpu.copy_model_parallel_attributes(master, param)
                self.model_params.append(param)
                self.master_params.append(master)
                masters.append(master)
            group["params"] = masters

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params + self.master_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss * loss_scale``, in fp32."""
        (loss.float() * self.loss_scale).backward()

    def _unscale_into_masters(self) -> None:
        inverse = 1.0 / self.loss_scale
        for param, master in zip(self.model_params, self.master_params):
            if param.grad is None:
                master.grad = None
                continue
            if master is not param:
                master.grad = param.grad.detach().float()
            if inverse != 1.0:
                master.grad.mul_(inverse)

    def step(self, max_norm: float = math.inf, nonfinite_loss: bool = False) -> tuple[float, bool]:
        """Unscale, clip to ``max_norm``, step and copy the masters back; skip on every rank when any rank's
        gradient norm (or, with ``nonfinite_loss``, its loss) is not finite."""
        self._unscale_into_masters()
        grad_norm = mpu.clip_grad_norm(self.master_params, max_norm)
        overflow = any_rank_overflowed(grad_norm, nonfinite_loss)
        self.loss_scaler.update_scale(overflow)
        if overflow:
            self.zero_grad()
            return grad_norm, True
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.model_params, self.master_params):
                if master is not param:
                    param.copy_(master)
        return grad_norm, False

    def state_bytes(self) -> int:
        """Bytes held for the optimizer on this rank: fp32 masters of half weights and the wrapped
        optimizer's state (Adam's moments), replicated on every data-parallel rank."""
        masters = sum(m.numel() * 4 for m, p in zip(self.master_params, self.model_params) if m is not p)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        return masters + state

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict(),
            "fp32_master_params": [m.detach() for m, p in zip(self.master_params, self.model_params)
                                   if m is not p],
        }

    def reload_model_params(self) -> None:
        """Refresh the fp32 masters from the model's weights (after loading weights into the model)."""
        with torch.no_grad():
            for param, master in zip(self.model_params, self.master_params):
                if master is not param:
                    master.copy_(param)

    def load_state_dict(self, state: dict) -> None:
        """Restore optimizer, scaler and master weights (and the half weights derived from them).

        A state saved in another precision still restores the optimizer moments; the masters then
        come from the model's (already loaded) weights, and the scaler starts afresh when its kind
        differs (an fp32 run's static scale of 1 must not become an fp16 run's dynamic scale).
        """
        self.optimizer.load_state_dict(state["optimizer"])
        if state["loss_scaler"].get("kind") == self.loss_scaler.state_dict()["kind"]:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        saved = state["fp32_master_params"]
        targets = [(p, m) for p, m in zip(self.model_params, self.master_params) if m is not p]
        if len(saved) != len(targets):
            self.reload_model_params()
            return
        with torch.no_grad():
            for (param, master), value in zip(targets, saved):
                master.copy_(value)
                param.copy_(master)
