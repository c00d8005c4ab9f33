"""Checkpoints of the 2019 Megatron-LM code (and NGC's 2020 GPT-2 release) as this toolkit's.

The 2019 code saved full pickles: an argparse namespace, numpy random state, and the model under
the names of its time (GPT2 already ours; BERT under Hugging Face's, with a fused query/key/value).
``import_megatron2019`` reads every rank's file (only for files you trust: unpickling runs code),
renames the tensors, joins them by the model's layout, and recovers the shape from the tensors and
the stored namespace. The real vocabulary size is not stored; it is taken from ``--vocab-size`` or
recognised among the known tokenizers by the 2019 padding rule (``pad_2019``). The weights are then
padded by this toolkit's rule and written as a ``release`` checkpoint at the target size.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import torch

from checkpointing import get_checkpoint_name, read_tracker
from errors import ConversionError
from model import TransformerConfig, bert_config, pad_vocab_size

from .huggingface import BERT_LAYER_NAMES, BERT_TOP_NAMES
from .layout import merge_parts, model_layout, repad
from .reshard import release_states

# Tokenizer sizes the 2019 releases used, recognised by their 2019 padding (a multiple of
# make-vocab-size-divisible-by x model-parallel size): GPT-2 BPE, BERT uncased, BERT cased.
KNOWN_VOCAB_SIZES = (50257, 30522, 28996)


def pad_2019(vocab_size: int, divisible_by: int, model_parallel_size: int) -> int:
    """The 2019 code's padded vocabulary: the next multiple of ``divisible_by * model_parallel_size``."""
    return pad_vocab_size(vocab_size, divisible_by, model_parallel_size, rule_2019=True)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _ours_from_2019(model: dict[str, torch.Tensor], where: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(model type, tensors under our names, still partitioned) from one rank's 2019 state dict."""
    model = _flatten(model)
    if "language_model.embedding.word_embeddings.weight" in model:  # the 2020 nested layout of NGC's GPT-2
        if any(k.startswith(("lm_head.", "binary_head.")) for k in model):
            raise ConversionError(f"{where}: a 2020 Megatron BERT (pre-LayerNorm); only 2019's post-LN BERT imports")
        renamed = {}
        for key, value in model.items():
            key = key.removeprefix("language_model.").removeprefix("embedding.")
            renamed[key] = value
        model = renamed
    if "word_embeddings.weight" in model:
        return "gpt2", {k: v for k, v in model.items() if not k.endswith("attention.masked_bias")}
    if "bert.embeddings.word_embeddings.weight" not in model:
        raise ConversionError(f"{where}: neither a 2019 GPT2 nor a 2019 BERT checkpoint (no word embeddings)")
    theirs_to_ours = {theirs: ours for ours, theirs in BERT_TOP_NAMES.items()}
    out = {}
    for key, value in model.items():
        if key in ("cls.predictions.decoder_weight", "cls.predictions.decoder.weight") or key.endswith("position_ids"):
            continue  # the tied word embedding again
        if key in theirs_to_ours:
            out[theirs_to_ours[key]] = value
            continue
        parts = key.split(".", 4)  # bert.encoder.layer.N.rest
        if parts[:3] != ["bert", "encoder", "layer"] or len(parts) < 5:
            raise ConversionError(f"{where}: unknown tensor {key}")
        index, rest = parts[3], parts[4]
        if rest.startswith("attention.self.query_key_value."):
            out[f"transformer.layers.{index}.attention.{rest.removeprefix('attention.self.')}"] = value
        elif rest.startswith("attention.self."):
            raise ConversionError(f"{where}: separate query/key/value ({key}): a pre-model-parallel BERT; "
                                  "convert it with tools/hf_checkpoint.py import (its names are Hugging Face's)")
        else:
            ours = {theirs: o for o, theirs in BERT_LAYER_NAMES.items()}.get(rest)
            if ours is None:
                raise ConversionError(f"{where}: unknown tensor {key}")
            out[f"transformer.layers.{index}.{ours}"] = value
    return "bert", out


def import_megatron2019(load_dir: str, target: int = 1, vocab_size: int | None = None,
                        num_attention_heads: int | None = None, divisible_by: int = 128
                        ) -> tuple[list[dict[str, Any]], str]:
    """A 2019 Megatron-LM checkpoint (full pickles: call only for files you trust) as per-rank
    ``release`` states of this toolkit at size ``target``, and a line saying how the vocabulary was read."""
    if not os.path.isdir(load_dir):
        raise ConversionError(f"{load_dir}: no such directory")
    iteration = read_tracker(load_dir)
    if iteration is None:
        raise ConversionError(f"{load_dir}: no latest_checkpointed_iteration.txt; point at the 2019 --save directory")
    folder = os.path.dirname(os.path.dirname(get_checkpoint_name(load_dir, iteration, 0)))
    ranks = sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_")) if os.path.isdir(folder) else []
    if not ranks:
        raise ConversionError(f"{folder}: missing; the tracker names iteration {iteration}")
    typed, namespace = [], {}
    for rank in range(len(ranks)):
        path = get_checkpoint_name(load_dir, iteration, rank)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, AttributeError, ModuleNotFoundError) as err:
            raise ConversionError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
        if not isinstance(state, dict) or "model" not in state:
            raise ConversionError(f"{path}: holds no 'model' state dict")
        if isinstance(state.get("config"), dict) and "model_parallel_size" in state:
            raise ConversionError(f"{load_dir}: this is a checkpoint of this toolkit, not of Megatron 2019: load it "
                                  f"directly (--load {load_dir}); nothing to import")
        if rank == 0 and hasattr(state.get("args"), "__dict__"):
            namespace = vars(state["args"])
        typed.append(_ours_from_2019(state["model"], path))
    model_type = typed[0][0]
    parts = [t[1] for t in typed]
    mp = len(parts)
    heads = num_attention_heads or namespace.get("num_attention_heads")
    if not heads:
        raise ConversionError(f"{load_dir}: the checkpoint stores no argument namespace with num_attention_heads; "
                              "pass --num-attention-heads")
    first = parts[0]
    word = first["word_embeddings.weight" if model_type == "gpt2" else "embeddings.word_embeddings.weight"]
    numbers = [int(k.split(".")[2]) for k in first if k.startswith("transformer.layers.")]
    if not numbers:
        raise ConversionError(f"{load_dir}: the checkpoint holds no transformer layers (transformer.layers.N.*); "
                              "not a 2019 GPT2 or BERT checkpoint")
    layers = 1 + max(numbers)
    shape = dict(num_layers=layers, hidden_size=word.shape[1], num_attention_heads=int(heads),
                 vocab_size=word.shape[0] * mp,
                 max_sequence_length=first[("" if model_type == "gpt2" else "embeddings.")
                                           + "position_embeddings.weight"].shape[0],
                 intermediate_size=first["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0] * mp)
    if namespace.get("layernorm_epsilon"):
        shape["layernorm_epsilon"] = float(namespace["layernorm_epsilon"])
    config = bert_config(**shape) if model_type == "bert" else TransformerConfig(**shape)
    layout = model_layout(model_type, config)
    full = merge_parts(parts, layout)
    divisible_2019 = int(namespace.get("make_vocab_size_divisible_by", 128))
    if vocab_size is None:
        matches = [v for v in KNOWN_VOCAB_SIZES if pad_2019(v, divisible_2019, mp) == config.vocab_size]
        if len(matches) != 1:
            raise ConversionError(f"{load_dir}: a padded vocabulary of {config.vocab_size} is not one of the known "
                                  "tokenizers'; pass --vocab-size (the tokenizer's size)")
        vocab_size = matches[0]
        how = f"vocabulary {vocab_size}, recognised by its 2019 padding to {config.vocab_size}"
    else:
        how = f"vocabulary {vocab_size} (--vocab-size)"
    if vocab_size > config.vocab_size:
        raise ConversionError(f"--vocab-size {vocab_size} is larger than the checkpoint's {config.vocab_size} rows")
    padded = pad_vocab_size(vocab_size, divisible_by, target)
    config = dataclasses.replace(config, vocab_size=padded, unpadded_vocab_size=vocab_size)
    full = repad(full, layout, padded)
    args = {"imported_from": os.path.abspath(load_dir), "make_vocab_size_divisible_by": divisible_by,
            **{k: namespace[k] for k in ("tokenizer_type", "tokenizer_model_type", "vocab_file", "merge_file")
               if isinstance(namespace.get(k), str)}}
    return release_states(model_type, config, full, target, args, load_dir), f"{how}, padded to {padded}"
