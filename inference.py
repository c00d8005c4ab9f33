"""A trained GPT2 checkpoint made ready for generation and evaluation.

``load_gpt2_for_inference(args, tokenizer, device)`` reads the checkpoint in ``--load``, takes the
model shape from the config stored in it (shape flags may be omitted; one that contradicts the
checkpoint is a ``CheckpointError`` naming both values), checks that the tokenizer pads to the
vocabulary the model was trained with, and returns the model in eval mode without dropout.
Call it after ``training.initialize_distributed(args)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

import mpu
from arguments import pad_vocab_size
from checkpointing import CheckpointError, checkpoint_root_of
from conversion import read_load_state
from model import GPT2Model, TransformerConfig

# Config field -> (args attribute, flag) for the shape flags a user may give or omit.
SHAPE_FLAGS = {
    "num_layers": ("num_layers", "--num-layers"),
    "hidden_size": ("hidden_size", "--hidden-size"),
    "num_attention_heads": ("num_attention_heads", "--num-attention-heads"),
    "max_sequence_length": ("max_position_embeddings", "--max-position-embeddings"),
    "intermediate_size": ("intermediate_size", "--intermediate-size"),
}


@dataclasses.dataclass
class LoadedCheckpoint:
    """Where a model came from: the directory, its iteration and the config and flags stored in it."""

    path: str
    iteration: int | str
    config: TransformerConfig
    args: dict[str, Any]


def _stored_config(load_dir: str, saved: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    missing = [name for name in SHAPE_FLAGS if name not in saved and name != "intermediate_size"]
    if missing or "vocab_size" not in saved:
        absent = ", ".join(missing or ["vocab_size"])
        raise CheckpointError(f"{load_dir}: the checkpoint stores no model config ({absent} missing); it was not "
                              "written by this toolkit's training")
    return {k: v for k, v in saved.items() if k in fields}


def check_shape_flags(load_dir: str, config: dict[str, Any], args) -> None:
    """Refuse shape flags given on the command line that differ from the checkpoint's config."""
    explicit = getattr(args, "explicit_flags", frozenset())
    for field, (dest, flag) in SHAPE_FLAGS.items():
        stored = config.get(field)
        if field == "intermediate_size" and stored is None:
            stored = 4 * config["hidden_size"]
        given = getattr(args, dest)
        if field == "intermediate_size" and given is None:
            continue
        if dest in explicit and given != stored:
            raise CheckpointError(f"{flag} {given} contradicts the checkpoint in {load_dir}, which has {flag} "
                                  f"{stored}; omit the flag to take the checkpoint's value")


def adopt_stored_shape(args, load_dir: str, config: dict[str, Any]) -> None:
    """Take the model shape (and LayerNorm epsilon) from a checkpoint's stored config for every such
    flag not given on the command line; a given one that contradicts it is a ``CheckpointError``."""
    check_shape_flags(load_dir, config, args)
    explicit = getattr(args, "explicit_flags", frozenset())
    for field, (dest, _) in {**SHAPE_FLAGS, "layernorm_epsilon": ("layernorm_epsilon", "")}.items():
        if dest not in explicit and field in config:
            setattr(args, dest, config[field])


def check_vocabulary(load_dir: str, saved: dict[str, Any], tokenizer_vocab_size: int, divisible_by: int) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's, or a model-parallel size its padding doesn't split."""
    mp_size = mpu.get_model_parallel_world_size()
    real = saved.get("unpadded_vocab_size")
    if real is not None:  # the checkpoint knows its tokenizer's size: compare that, whatever the padding
        if real != tokenizer_vocab_size:
            raise CheckpointError(f"{load_dir}: the model was trained with a vocabulary of {real} tokens, this "
                                  f"tokenizer has {tokenizer_vocab_size}; use the model's vocabulary files")
        if saved["vocab_size"] % mp_size:
            raise CheckpointError(f"{load_dir}: its padded vocabulary of {saved['vocab_size']} does not split over "
                                  f"model-parallel size {mp_size}; reshard it with tools/reshard_checkpoint.py")
        return
    padded = pad_vocab_size(tokenizer_vocab_size, divisible_by, mp_size)
    if padded != saved["vocab_size"]:
        raise CheckpointError(
            f"{load_dir}: the model has a vocabulary of {saved['vocab_size']} (padded) but this tokenizer pads "
            f"{tokenizer_vocab_size} tokens to {padded}; use the vocabulary and --make-vocab-size-divisible-by "
            "the model was trained with"
        )


def load_gpt2_for_inference(args, tokenizer, device: torch.device,
                            parallel_output: bool = True) -> tuple[GPT2Model, LoadedCheckpoint]:
    """The GPT2 model in ``args.load``, on ``device``, in eval mode, with the shape flags set from it."""
    if not args.load:
        raise CheckpointError("no checkpoint to load: give --load DIR (a directory written by --save)")
    root = checkpoint_root_of(args.load)
    if root is not None and os.path.abspath(args.load) != root:
        raise CheckpointError(f"--load {args.load} lies inside a checkpoint; pass the directory holding "
                              f"latest_checkpointed_iteration.txt: --load {root}")
    ckpt = read_load_state(args)
    if ckpt is None:
        raise CheckpointError(f"{args.load}: no checkpoint there (no latest_checkpointed_iteration.txt); "
                              "point --load at a directory written by --save")
    saved = _stored_config(args.load, ckpt.get("config", {}))
    if saved.get("post_layernorm") or saved.get("num_tokentypes"):
        raise CheckpointError(f"{args.load}: this is a BERT checkpoint; generation and evaluation take GPT2 ones")
    check_shape_flags(args.load, saved, args)
    check_vocabulary(args.load, saved, tokenizer.vocab_size, args.make_vocab_size_divisible_by)
    config = TransformerConfig(**{**saved, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                  "checkpoint_activations": False})
    for field, (dest, _) in SHAPE_FLAGS.items():
        setattr(args, dest, getattr(config, field))
    model = GPT2Model(config, parallel_output=parallel_output)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{args.load}: the weights do not fit the stored config ({str(err).splitlines()[0]})") \
            from None
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    if not mpu.get_cuda_rng_tracker().get_states():  # attention forks the model-parallel stream
        mpu.model_parallel_cuda_manual_seed(args.seed)
    return model, LoadedCheckpoint(args.load, ckpt["iteration"], config, ckpt.get("args", {}))
