"""Learning-rate schedule: linear warmup, then constant, linear, cosine or exponential decay."""

from __future__ import annotations

import math

import torch

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")


class AnnealingLR:
    """Sets ``lr`` on every parameter group of ``optimizer`` from the iteration count.

    Warmup rises linearly from 0 to ``start_lr`` over ``warmup_iter`` iterations; decay then runs
    from ``start_lr`` towards ``min_lr`` until ``num_iters`` (= ``--lr-decay-iters``) and stays
    there. ``exponential`` halves the rate over the decay span (Megatron's ``exp(-0.693 t)``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        start_lr: float,
        warmup_iter: int,
        num_iters: int,
        decay_style: str,
        last_iter: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown --lr-decay-style {decay_style!r}; choose one of {DECAY_STYLES}")
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.min_lr = min_lr
        self.warmup_iter = warmup_iter
        self.end_iter = num_iters
        self.decay_style = decay_style
        self.num_iters = last_iter
        self._apply()

    def get_lr(self) -> float:
        it = self.num_iters
        if self.warmup_iter > 0 and it <= self.warmup_iter:
            return self.start_lr * it / self.warmup_iter
        if self.decay_style == "constant":
            return self.start_lr
        span = max(1, self.end_iter - self.warmup_iter)
        progress = min(1.0, max(0.0, (it - self.warmup_iter) / span))
        if self.decay_style == "linear":
            factor = 1.0 - progress
        elif self.decay_style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = math.exp(-0.693 * progress)
        return self.min_lr + (self.start_lr - self.min_lr) * factor

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Advance one iteration and set the new rate."""
        self.num_iters += 1
        self._apply()

    def state_dict(self) -> dict:
        return {
            "start_lr": self.start_lr,
            "min_lr": self.min_lr,
            "warmup_iter": self.warmup_iter,
            "end_iter": self.end_iter,
            "decay_style": self.decay_style,
            "num_iters": self.num_iters,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the iteration count; the schedule's shape comes from the current flags."""
        self.num_iters = int(state["num_iters"])
        self._apply()
