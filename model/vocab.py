"""The one vocabulary-padding rule, and the 2019 code's, which its checkpoints were padded by.

The word embedding (and with it the output layer) gets rows up to a multiple so that every
model-parallel rank holds an equal slice; the padded rows are masked out of the logits
(``TransformerConfig.unpadded_vocab_size``).
"""

from __future__ import annotations

import math


def padding_multiple(divisible_by: int, model_parallel_size: int, rule_2019: bool = False) -> int:
    """The multiple a vocabulary is padded to: ``lcm(divisible_by, model_parallel_size)``, or with
    ``rule_2019`` the 2019 code's product ``divisible_by * model_parallel_size``.

    The lcm keeps the padded size, and with it the initial weights, the same for every model-parallel
    size that divides ``divisible_by`` (GPT-2's 50257 pads to 50304 at sizes 1 to 128).
    """
    divisible_by = max(1, divisible_by)
    return divisible_by * model_parallel_size if rule_2019 else math.lcm(divisible_by, model_parallel_size)


def pad_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int, rule_2019: bool = False) -> int:
    """``vocab_size`` rounded up to ``padding_multiple(divisible_by, model_parallel_size, rule_2019)``."""
    multiple = padding_multiple(divisible_by, model_parallel_size, rule_2019)
    return -(-vocab_size // multiple) * multiple


def repad_vocab_size(padded: int, unpadded: int | None, model_parallel_size: int, divisible_by: int) -> int:
    """A model's padded vocabulary at another model-parallel size: unchanged when that size splits it,
    else the rule above applied to the real vocabulary (``unpadded``, or ``padded`` when unknown)."""
    if padded % model_parallel_size == 0:
        return padded
    return pad_vocab_size(unpadded or padded, divisible_by, model_parallel_size)
