"""Transformer models built from ``mpu`` layers."""

from .gpt2 import GPT2Model, get_masks_and_position_ids
from .transformer import (
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformer,
    ParallelTransformerLayer,
    TransformerConfig,
    init_method_normal,
    scaled_init_method,
)

__all__ = [
    "GPT2Model",
    "ParallelMLP",
    "ParallelSelfAttention",
    "ParallelTransformer",
    "ParallelTransformerLayer",
    "TransformerConfig",
    "get_masks_and_position_ids",
    "init_method_normal",
    "scaled_init_method",
]
