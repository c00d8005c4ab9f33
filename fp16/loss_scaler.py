"""Loss scaling for half-precision training.

The loss is multiplied by ``loss_scale`` before backward so that small gradients survive in fp16,
and the gradients are divided by it again before the step. A step whose gradients overflowed
(inf/nan) is skipped by the optimizer wrapper; the scaler only decides the next scale.
"""

from __future__ import annotations


class LossScaler:
    """A fixed scale (``--loss-scale``; 1.0 for fp32 and bf16). Overflowing steps are still skipped."""

    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = float(scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """A static scale never changes."""

    def state_dict(self) -> dict:
        return {"kind": "static", "cur_scale": self.cur_scale}

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale = float(state["cur_scale"])


class DynamicLossScaler(LossScaler):
    """A scale that halves after ``hysteresis`` overflows and doubles after ``scale_window`` clean steps.

    The overflow budget (``hysteresis``) is refilled whenever the scale grows; the scale never
    falls below ``min_scale``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**32,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        hysteresis: int = 2,
    ) -> None:
        super().__init__(init_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.hysteresis = int(hysteresis)
        self.hysteresis_left = self.hysteresis
        self.clean_steps = 0

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.scale_window:
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis
            self.cur_scale *= self.scale_factor

    def state_dict(self) -> dict:
        return {
            "kind": "dynamic",
            "cur_scale": self.cur_scale,
            "hysteresis_left": self.hysteresis_left,
            "clean_steps": self.clean_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale = float(state["cur_scale"])
        self.hysteresis_left = int(state.get("hysteresis_left", self.hysteresis))
        self.clean_steps = int(state.get("clean_steps", 0))
