"""How this toolkit's models lay their tensors out over model-parallel ranks, read from the models.

Every conversion works on full (unpartitioned) tensors, so it needs to know which tensors a
checkpoint holds in pieces, along which dimension, with which stride, and which ones are rows of the
vocabulary. None of that is written down here: ``model_layout`` builds the model on the ``meta``
device from the stored config and reads the ``partition_dim`` / ``partition_stride`` tags its layers
put on their parameters, plus the optimizer's parameter order. ``split_full``, ``merge_parts`` and
``repad`` then cut full tensors into per-rank pieces, join pieces back together, and resize the
vocabulary rows; ``padded_size`` and ``check_divisible`` say what a target model-parallel size needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import mpu
from errors import ConversionError
from model import BertModel, GPT2Model, TransformerConfig, optimizer_param_groups
from model.vocab import repad_vocab_size

MODEL_TYPES = ("gpt2", "bert")


@contextlib.contextmanager
def model_parallel_of_one() -> Iterator[None]:
    """A process group of one and model-parallel size 1 for building a model outside a run; what
    was already initialised is left as it is."""
    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    made_mpu = not mpu.model_parallel_is_initialized()
    if made_mpu:
        mpu.initialize_model_parallel(1)
    try:
        yield
    finally:
        if made_mpu:
            mpu.destroy_model_parallel()
        if made_group:
            dist.destroy_process_group()


def model_type_of(model_state: dict[str, Any]) -> str:
    """``"bert"`` or ``"gpt2"``, by the tensors a checkpoint's model holds."""
    if "embeddings.word_embeddings.weight" in model_state:
        return "bert"
    if "word_embeddings.weight" in model_state:
        return "gpt2"
    raise ConversionError("the checkpoint holds neither a GPT2 nor a BERT model of this toolkit")


def build_model(model_type: str, config: TransformerConfig, device: str | torch.device = "meta") -> nn.Module:
    """The bare model of ``config`` (at the current model-parallel size), by default without storage."""
    with torch.device(device):
        return BertModel(config) if model_type == "bert" else GPT2Model(config)


def vocab_parallel_names(model: nn.Module) -> set[str]:
    """Parameters split over the vocabulary: the word embeddings and BERT's LM-head bias."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, mpu.VocabParallelEmbedding):
            names.add(f"{prefix}.weight")
    if isinstance(model, BertModel):
        names.add("lm_head.bias")
    return names


@dataclasses.dataclass
class Layout:
    """How a model's tensors are laid out: ``split[name] = (dim, stride)`` for partitioned ones
    (absent for replicated ones), the vocabulary-split names, and the optimizer's parameter order."""

    split: dict[str, tuple[int, int]]
    vocab: set[str]
    optimizer_order: list[str]
    num_decay: int = 0
    """How many of ``optimizer_order`` form the first (weight-decay) parameter group."""


def model_layout(model_type: str, config: TransformerConfig) -> Layout:
    with model_parallel_of_one():
        model = build_model(model_type, config)
    split = {name: (param.partition_dim, param.partition_stride) for name, param in model.named_parameters()
             if getattr(param, "model_parallel", False)}
    decay, no_decay = optimizer_param_groups(model)
    return Layout(split, vocab_parallel_names(model), [name for name, _ in decay + no_decay], len(decay))


WORD_EMBEDDINGS = {"gpt2": "word_embeddings.weight", "bert": "embeddings.word_embeddings.weight"}
FIRST_STAGE_PREFIXES = {"gpt2": ("position_embeddings.",), "bert": ("embeddings.",)}


def stage_owns(name: str, model_type: str, num_layers: int, pp: int, rank: int, virtual: int = 1) -> bool:
    """Whether pipeline stage ``rank`` of ``pp`` (with ``virtual`` chunks) holds parameter ``name``: its
    layers' parameters, the embeddings on the first stage, the final LayerNorm and heads on the last,
    and the word embeddings on both (the models' own rule, which a test holds them to)."""
    chunks = mpu.layer_chunks(num_layers, pp, rank, virtual)
    first, last = chunks[0][0] == 0, chunks[-1][1] == num_layers
    if name.startswith("transformer.layers."):
        number = int(name.split(".")[2])
        return any(start <= number < end for start, end in chunks)
    if name == WORD_EMBEDDINGS[model_type]:
        return first or last
    if name.startswith(FIRST_STAGE_PREFIXES[model_type]):
        return first
    return last


def check_divisible(config: TransformerConfig, size: int, where: str) -> None:
    """One clear line when ``size`` cannot split this model's heads, widths or vocabulary."""
    for what, value in (("attention heads", config.num_attention_heads), ("hidden size", config.hidden_size),
                        ("MLP width", config.ffn_hidden_size), ("padded vocabulary", config.vocab_size)):
        if value % size:
            raise ConversionError(f"{where}: model-parallel size {size} does not divide the {what} ({value})")


def padded_size(config: TransformerConfig, size: int, divisible_by: int) -> int:
    """The padded vocabulary at model-parallel ``size`` (``model.repad_vocab_size``)."""
    return repad_vocab_size(config.vocab_size, config.unpadded_vocab_size, size, divisible_by)


def resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut or zero-extend dimension 0 to ``rows`` (padded vocabulary entries only)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows].clone()
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def split_full(full: dict[str, torch.Tensor], layout: Layout, size: int) -> list[dict[str, torch.Tensor]]:
    """Each of ``size`` ranks' tensors from full ones: partitioned ones cut, replicated ones shared."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, tensor in full.items():
        for rank in range(size):
            if name in layout.split:
                dim, stride = layout.split[name]
                parts[rank][name] = mpu.partition_tensor(tensor, size, rank, dim, stride).clone()
            else:
                parts[rank][name] = tensor
    return parts


def merge_parts(parts: list[dict[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's pieces; replicated ones come from rank 0."""
    full = {}
    for name, tensor in parts[0].items():
        if name in layout.split and len(parts) > 1:
            dim, stride = layout.split[name]
            full[name] = mpu.merge_partitions([p[name] for p in parts], dim, stride)
        else:
            full[name] = tensor
    return full


def repad(full: dict[str, torch.Tensor], layout: Layout, rows: int) -> dict[str, torch.Tensor]:
    """Full tensors with the vocabulary-split ones cut or zero-extended to ``rows``."""
    return {name: resize_rows(t, rows) if name in layout.vocab else t for name, t in full.items()}
