"""How many micro-batches make one global batch, at each point of a run.

One iteration is one optimiser step on a global batch of ``global_batch_size`` samples: every
data-parallel rank runs forward and backward on micro-batches of ``micro_batch_size`` samples and
accumulates their gradients, ``global_batch_size / (micro_batch_size * data_parallel_size)`` of them.
With a ramp-up (Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``) the global batch starts at
``START`` and grows by ``INCREMENT`` in equal steps spread over the first ``SAMPLES`` samples; it is
then a function of the samples consumed so far, which is what a checkpoint stores, so a resumed run
continues the ramp exactly.
"""

from __future__ import annotations

import dataclasses

from errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    """The global batch of every iteration; checked on construction (an ``ArgumentError`` names the flag)."""

    micro_batch_size: int
    data_parallel_size: int
    global_batch_size: int
    rampup: tuple[int, int, int] | None = None  # (start, increment, samples)

    def __post_init__(self) -> None:
        step = self.micro_batch_size * self.data_parallel_size
        if self.micro_batch_size < 1:
            raise ArgumentError(f"--micro-batch-size must be at least 1, got {self.micro_batch_size}")
        if self.global_batch_size < 1 or self.global_batch_size % step:
            raise ArgumentError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size} = {step}; "
                f"use a multiple of {step} (e.g. {max(1, self.global_batch_size // step) * step})")
        if self.rampup is None:
            return
        start, increment, samples = self.rampup
        flag = f"--rampup-batch-size {start} {increment} {samples}"
        if start < 1 or increment < 1 or samples < 0:
            raise ArgumentError(f"{flag}: the start and the increment must be at least 1, the samples at least 0")
        if start > self.global_batch_size or (self.global_batch_size - start) % increment:
            raise ArgumentError(f"{flag}: the ramp must reach --global-batch-size {self.global_batch_size} from "
                                f"{start} in whole increments of {increment}")
        if start % step or increment % step:
            raise ArgumentError(f"{flag}: the start and the increment must be multiples of --micro-batch-size x "
                                f"data-parallel size = {step}, so that every global batch splits into micro-batches")

    @property
    def samples_per_micro_step(self) -> int:
        """Samples all data-parallel ranks together consume in one micro-batch step."""
        return self.micro_batch_size * self.data_parallel_size

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts after ``consumed_samples`` samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        increments = (self.global_batch_size - start) // increment
        if increments == 0 or consumed_samples >= samples:
            return self.global_batch_size
        done = int(consumed_samples * increments // samples)  # whole increments passed (exact integer arithmetic)
        return min(self.global_batch_size, start + done * increment)

    def micro_batches_at(self, consumed_samples: int) -> int:
        """Micro-batches each data-parallel rank accumulates in the iteration after ``consumed_samples``."""
        return self.global_batch_at(consumed_samples) // self.samples_per_micro_step

    def describe(self) -> str:
        """The arithmetic in words, for the start and the end of a run."""
        steps = self.global_batch_size // self.samples_per_micro_step
        text = (f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x {steps} accumulation "
                f"step{'s' * (steps != 1)} x {self.data_parallel_size} data-parallel rank"
                f"{'s' * (self.data_parallel_size != 1)}")
        if self.rampup is not None:
            start, increment, samples = self.rampup
            text += f", ramped up from {start} by {increment} over the first {samples} samples"
        return text

    def samples_after(self, iterations: int, consumed_samples: int = 0) -> int:
        """Samples consumed once ``iterations`` more iterations follow ``consumed_samples``."""
        consumed = consumed_samples
        if self.rampup is None:
            return consumed + iterations * self.global_batch_size
        for done in range(iterations):
            if consumed >= self.rampup[2]:  # past the ramp: the rest in one product
                return consumed + (iterations - done) * self.global_batch_size
            consumed += self.global_batch_at(consumed)
        return consumed
