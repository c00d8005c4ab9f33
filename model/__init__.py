"""Transformer models built from ``mpu`` layers."""

from .bert import BertModel, bert_config, hf_bert_to_megatron, load_full_state_dict
from .gpt2 import GPT2Model, get_masks_and_position_ids
from .transformer import (
    KVCache,
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformer,
    ParallelTransformerLayer,
    TransformerConfig,
    init_method_normal,
    scaled_init_method,
)

__all__ = [
    "BertModel",
    "KVCache",
    "GPT2Model",
    "ParallelMLP",
    "ParallelSelfAttention",
    "ParallelTransformer",
    "ParallelTransformerLayer",
    "TransformerConfig",
    "bert_config",
    "hf_bert_to_megatron",
    "load_full_state_dict",
    "get_masks_and_position_ids",
    "init_method_normal",
    "scaled_init_method",
]
