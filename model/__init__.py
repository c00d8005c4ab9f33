"""Transformer models built from ``mpu`` layers."""

from .bert import BERT_DEFAULTS, BertModel, bert_config
from .gpt2 import GPT2Model, get_masks_and_position_ids, gpt2_forward_step
from .parameters import optimizer_param_groups
from .transformer import (
    SHAPE_FIELDS,
    KVCache,
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformer,
    ParallelTransformerLayer,
    TransformerConfig,
    init_method_normal,
    scaled_init_method,
)
from .vocab import pad_vocab_size, padding_multiple, repad_vocab_size

__all__ = [
    "BERT_DEFAULTS",
    "BertModel",
    "KVCache",
    "GPT2Model",
    "ParallelMLP",
    "ParallelSelfAttention",
    "ParallelTransformer",
    "ParallelTransformerLayer",
    "SHAPE_FIELDS",
    "TransformerConfig",
    "bert_config",
    "get_masks_and_position_ids",
    "gpt2_forward_step",
    "init_method_normal",
    "optimizer_param_groups",
    "pad_vocab_size",
    "padding_multiple",
    "repad_vocab_size",
    "scaled_init_method",
]
