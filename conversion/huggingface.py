"""Checkpoint conversion: model-parallel resharding and Hugging Face GPT2/BERT weights, both ways.

A checkpoint's partitioned tensors are reassembled and cut again by the layout tags the layers put
on their parameters (``partition_dim``, ``partition_stride``); the tags come from the model itself,
built on the ``meta`` device from the stored config, so no rule here repeats the layers' knowledge.
Everything works on full (unpartitioned) tensors in between:

* ``reshard_states``: every rank's state of a checkpoint -> the states at another model-parallel
  size, weights, optimizer moments and fp32 masters alike;
* ``hf_to_full`` / ``full_to_hf``: Hugging Face ``GPT2LMHeadModel`` / ``BertForPreTraining`` tensor
  names and layouts (GPT2's ``Conv1D`` stores ``(in, out)``; three separate Q, K, V) <-> ours;
* ``release_states``: full tensors and a config -> a ``release`` checkpoint at any size.

The tools in ``tools/`` are thin command lines over these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import mpu
from atomic import remove_orphans, temporary_path
from checkpointing import get_checkpoint_name, read_tracker
from errors import ConversionError
from model import BertModel, GPT2Model, TransformerConfig, bert_config, optimizer_param_groups, pad_vocab_size
from model.bert import _HF_LAYER, _HF_TOP, hf_bert_to_megatron
from model.vocab import repad_vocab_size

MODEL_TYPES = ("gpt2", "bert")


# ---------------------------------------------------------------------------------------------
# The model's own layout
# ---------------------------------------------------------------------------------------------


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


def model_layout(model_type: str, config: TransformerConfig) -> Layout:
    with model_parallel_of_one():
        model = build_model(model_type, config)
    split = {name: (param.partition_dim, param.partition_stride) for name, param in model.named_parameters()
             if getattr(param, "model_parallel", False)}
    decay, no_decay = optimizer_param_groups(model)
    return Layout(split, vocab_parallel_names(model), [name for name, _ in decay + no_decay])


def check_divisible(config: TransformerConfig, size: int, where: str) -> None:
    """One clear line when ``size`` cannot split this model's heads, widths or vocabulary."""
    for what, value in (("attention heads", config.num_attention_heads), ("hidden size", config.hidden_size),
                        ("MLP width", config.ffn_hidden_size), ("padded vocabulary", config.vocab_size)):
        if value % size:
            raise ConversionError(f"{where}: model-parallel size {size} does not divide the {what} ({value})")


def padded_size(config: TransformerConfig, size: int, divisible_by: int) -> int:
    """The padded vocabulary at model-parallel ``size`` (``model.repad_vocab_size``)."""
    return repad_vocab_size(config.vocab_size, config.unpadded_vocab_size, size, divisible_by)


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut or zero-extend dimension 0 to ``rows`` (padded vocabulary entries only)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows].clone()
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def _split(full: dict[str, torch.Tensor], layout: Layout, size: int) -> list[dict[str, torch.Tensor]]:
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, tensor in full.items():
        for rank in range(size):
            if name in layout.split:
                dim, stride = layout.split[name]
                parts[rank][name] = mpu.partition_tensor(tensor, size, rank, dim, stride).clone()
            else:
                parts[rank][name] = tensor
    return parts


def _merge(parts: list[dict[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    full = {}
    for name, tensor in parts[0].items():
        if name in layout.split and len(parts) > 1:
            dim, stride = layout.split[name]
            full[name] = mpu.merge_partitions([p[name] for p in parts], dim, stride)
        else:
            full[name] = tensor
    return full


def _repad(full: dict[str, torch.Tensor], layout: Layout, rows: int) -> dict[str, torch.Tensor]:
    return {name: _resize_rows(t, rows) if name in layout.vocab else t for name, t in full.items()}


# ---------------------------------------------------------------------------------------------
# Resharding
# ---------------------------------------------------------------------------------------------


def _optimizer_full(states: list[dict[str, Any]], layout: Layout, model_dtypes: dict[str, torch.dtype],
                    rows: int) -> tuple[dict, dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The optimizer states of every rank merged: (rank 0's FP16_Optimizer dict, per-parameter state
    as full tensors keyed by name, fp32 masters as full tensors keyed by name)."""
    order = layout.optimizer_order
    opts = [s["optimizer"] for s in states]
    inner = [o["optimizer"] for o in opts]
    count = sum(len(g["params"]) for g in inner[0]["param_groups"])
    if count != len(order):
        raise ConversionError(f"the optimizer state numbers {count} parameters, the model has {len(order)}; "
                              "was it saved by this toolkit's training?")
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(order):
        if index not in inner[0]["state"]:
            continue  # never stepped
        entry = {}
        for key, value in inner[0]["state"][index].items():
            parts = [o["state"][index][key] for o in inner]
            if name in layout.split and torch.is_tensor(value) and value.dim() > 0 and len(parts) > 1:
                dim, stride = layout.split[name]
                value = mpu.merge_partitions(parts, dim, stride)
            if name in layout.vocab and torch.is_tensor(value) and value.dim() > 0:
                value = _resize_rows(value, rows)
            entry[key] = value
        per_param[name] = entry
    half = [name for name in order if model_dtypes[name] != torch.float32]
    masters_lists = [o.get("fp32_master_params", []) for o in opts]
    masters: dict[str, torch.Tensor] = {}
    if masters_lists[0]:
        if len(masters_lists[0]) != len(half):
            raise ConversionError(f"the optimizer holds {len(masters_lists[0])} fp32 master weights for "
                                  f"{len(half)} half-precision parameters")
        for i, name in enumerate(half):
            parts = [m[i] for m in masters_lists]
            value = parts[0]
            if name in layout.split and len(parts) > 1:
                value = mpu.merge_partitions(parts, *layout.split[name])
            masters[name] = _resize_rows(value, rows) if name in layout.vocab else value
    return opts[0], per_param, masters


def _optimizer_at(rank: int, size: int, template: dict, per_param: dict, masters: dict, layout: Layout,
                  model_dtypes: dict[str, torch.dtype]) -> dict:
    def cut(name: str, value: Any) -> Any:
        if name in layout.split and torch.is_tensor(value) and value.dim() > 0:
            dim, stride = layout.split[name]
            return mpu.partition_tensor(value, size, rank, dim, stride).clone()
        return value

    order = layout.optimizer_order
    inner = template["optimizer"]
    state = {index: {key: cut(name, v) for key, v in per_param[name].items()}
             for index, name in enumerate(order) if name in per_param}
    half = [name for name in order if model_dtypes[name] != torch.float32]
    return {
        **template,
        "optimizer": {"state": state, "param_groups": inner["param_groups"]},
        "fp32_master_params": [cut(name, masters[name]) for name in half] if masters else [],
    }


def reshard_states(states: list[dict[str, Any]], target: int, keep_optimizer: bool = True,
                   divisible_by: int = 128, where: str = "checkpoint") -> list[dict[str, Any]]:
    """A checkpoint's per-rank states at model-parallel size ``target``.

    Weights, Adam moments and fp32 masters are merged and cut by the model's layout; the vocabulary
    is re-padded with zero rows when ``target`` does not split it (they get no probability when the
    config knows the real vocabulary size, as every checkpoint written since it does).
    Everything replicated comes from rank 0; the model-parallel dropout streams cannot follow the
    heads to another size and are left out (a resumed run seeds them afresh).
    """
    first = states[0]
    saved = first.get("config")
    if not saved:
        raise ConversionError(f"{where}: stores no model config; it was not written by this toolkit's training")
    config = TransformerConfig(**saved)
    model_type = model_type_of(first["model"])
    layout = model_layout(model_type, config)
    rows = padded_size(config, target, divisible_by)
    new_config = dataclasses.replace(config, vocab_size=rows)
    check_divisible(new_config, target, where)
    model_dtypes = {name: t.dtype for name, t in first["model"].items()}
    full = _repad(_merge([s["model"] for s in states], layout), layout, rows)
    parts = _split(full, layout, target)
    has_optimizer = keep_optimizer and "optimizer" in first
    if has_optimizer:
        template, per_param, masters = _optimizer_full(states, layout, model_dtypes, rows)
    out = []
    for rank in range(target):
        state = {k: v for k, v in first.items() if k not in ("model", "optimizer", "rng")}
        state.update(model_parallel_size=target, model=parts[rank], config=dataclasses.asdict(new_config))
        if "args" in state:
            state["args"] = {**state["args"], "model_parallel_size": target}
        if "rng" in first:
            state["rng"] = {k: v for k, v in first["rng"].items() if k != "tracker"}
        if has_optimizer:
            state["optimizer"] = _optimizer_at(rank, target, template, per_param, masters, layout, model_dtypes)
        elif not keep_optimizer:
            state.pop("lr_scheduler", None)  # as with --no-save-optim: the flags' schedule continues
        out.append(state)
    return out


def full_model_state(states: list[dict[str, Any]]) -> tuple[str, TransformerConfig, dict[str, torch.Tensor]]:
    """(model type, config, full tensors) of a checkpoint's per-rank states."""
    config = TransformerConfig(**states[0]["config"])
    model_type = model_type_of(states[0]["model"])
    return model_type, config, _merge([s["model"] for s in states], model_layout(model_type, config))


def release_states(model_type: str, config: TransformerConfig, full: dict[str, torch.Tensor], target: int,
                   args: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Per-rank states of a weights-only ``release`` checkpoint at model-parallel size ``target``."""
    check_divisible(config, target, where)
    layout = model_layout(model_type, config)
    with model_parallel_of_one():  # inside a run the model is built at the run's size: scale back up
        world = mpu.get_model_parallel_world_size()
        expected = {name: list(t.shape) for name, t in build_model(model_type, config).state_dict().items()}
    for name, (dim, _) in layout.split.items():
        expected[name][dim] *= world
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(full) - set(expected))
    if missing or extra:
        raise ConversionError(f"{where}: the weights do not make a {model_type} model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in full.items():
        if list(tensor.shape) != expected[name]:
            raise ConversionError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config needs "
                                  f"{tuple(expected[name])}")
    parts = _split({k: v.contiguous() for k, v in full.items()}, layout, target)
    return [{"iteration": "release", "model_parallel_size": target, "model": parts[rank],
             "config": dataclasses.asdict(config), "args": {**args, "model_parallel_size": target}}
            for rank in range(target)]


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------

_GPT2_LAYER = {  # ours -> (theirs under transformer.h.{i}., a Conv1D weight stored (in, out) to transpose)
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "attention.query_key_value.weight": ("attn.c_attn.weight", True),
    "attention.query_key_value.bias": ("attn.c_attn.bias", False),
    "attention.dense.weight": ("attn.c_proj.weight", True),
    "attention.dense.bias": ("attn.c_proj.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "mlp.dense_h_to_4h.weight": ("mlp.c_fc.weight", True),
    "mlp.dense_h_to_4h.bias": ("mlp.c_fc.bias", False),
    "mlp.dense_4h_to_h.weight": ("mlp.c_proj.weight", True),
    "mlp.dense_4h_to_h.bias": ("mlp.c_proj.bias", False),
}
_GPT2_TOP = {
    "word_embeddings.weight": "transformer.wte.weight",
    "position_embeddings.weight": "transformer.wpe.weight",
    "transformer.final_layernorm.weight": "transformer.ln_f.weight",
    "transformer.final_layernorm.bias": "transformer.ln_f.bias",
}
# Buffers and tied copies a Hugging Face file may carry that hold no weights of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "lm_head.weight",
                     "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
BERT_ARCHITECTURES = ("BertForPreTraining", "BertModel", "BertForMaskedLM")


def safetensors_torch():
    """``safetensors.torch``, or one line saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConversionError("Hugging Face weight files need the safetensors package: pip install safetensors") \
            from None
    return safetensors.torch


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such directory")
    config_path = os.path.join(hf_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{config_path}: missing; a Hugging Face model folder has config.json") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    return config


def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder: ``model.safetensors`` (or its sharded index), else
    ``pytorch_model.bin`` read with ``weights_only=True``."""
    load_file = safetensors_torch().load_file

    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    legacy = os.path.join(hf_dir, "pytorch_model.bin")
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(os.path.join(hf_dir, shard)))
            return state
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"{hf_dir}: unreadable safetensors weights ({str(err).splitlines()[0]})") from None
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unpickling failure is the same answer
            raise ConversionError(f"{legacy}: does not load with weights_only=True ({str(err).splitlines()[0]}); "
                                  "convert it to model.safetensors first") from None
    raise ConversionError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")


def hf_model_type(hf_config: dict[str, Any], where: str) -> str:
    architectures = hf_config.get("architectures") or []
    kind = hf_config.get("model_type")
    if kind == "gpt2" or any(a in GPT2_ARCHITECTURES for a in architectures):
        return "gpt2"
    if kind == "bert" or any(a in BERT_ARCHITECTURES for a in architectures):
        return "bert"
    shown = ", ".join(architectures) or kind or "none given"
    raise ConversionError(f"{where}: unsupported architecture ({shown}); GPT2 ({', '.join(GPT2_ARCHITECTURES)}) "
                          f"and BERT ({', '.join(BERT_ARCHITECTURES)}) convert")


def _need(hf_config: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf_config:
        raise ConversionError(f"{where}: config.json has no {key!r}")
    return hf_config[key]


def config_from_hf(hf_config: dict[str, Any], model_type: str, padded_vocab: int, where: str) -> TransformerConfig:
    """Our ``TransformerConfig`` for a Hugging Face config (vocabulary padded to ``padded_vocab``)."""
    vocab = int(_need(hf_config, "vocab_size", where))
    if model_type == "gpt2":
        act = hf_config.get("activation_function", "gelu_new")
        if act not in GPT2_TANH_GELUS + ("gelu",):
            raise ConversionError(f"{where}: activation_function {act!r} is not supported (GELU only)")
        return TransformerConfig(
            num_layers=int(_need(hf_config, "n_layer", where)), hidden_size=int(_need(hf_config, "n_embd", where)),
            num_attention_heads=int(_need(hf_config, "n_head", where)), vocab_size=padded_vocab,
            max_sequence_length=int(_need(hf_config, "n_positions", where)),
            intermediate_size=hf_config.get("n_inner"), exact_gelu=act == "gelu",
            hidden_dropout=float(hf_config.get("resid_pdrop", 0.1)),
            attention_dropout=float(hf_config.get("attn_pdrop", 0.1)),
            layernorm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
            init_method_std=float(hf_config.get("initializer_range", 0.02)), unpadded_vocab_size=vocab,
        )
    act = hf_config.get("hidden_act", "gelu")
    if act not in ("gelu",) + GPT2_TANH_GELUS:
        raise ConversionError(f"{where}: hidden_act {act!r} is not supported (GELU only)")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{where}: position_embedding_type {hf_config['position_embedding_type']!r} is not "
                              "supported (absolute only)")
    return bert_config(
        num_layers=int(_need(hf_config, "num_hidden_layers", where)),
        hidden_size=int(_need(hf_config, "hidden_size", where)),
        num_attention_heads=int(_need(hf_config, "num_attention_heads", where)), vocab_size=padded_vocab,
        max_sequence_length=int(_need(hf_config, "max_position_embeddings", where)),
        intermediate_size=int(hf_config.get("intermediate_size", 4 * hf_config["hidden_size"])),
        exact_gelu=act == "gelu", num_tokentypes=int(hf_config.get("type_vocab_size", 2)),
        hidden_dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        layernorm_epsilon=float(hf_config.get("layer_norm_eps", 1e-12)),
        init_method_std=float(hf_config.get("initializer_range", 0.02)), unpadded_vocab_size=vocab,
    )


def _fresh_bert_heads(config: TransformerConfig, seed: int) -> dict[str, torch.Tensor]:
    """Newly initialised pooler, LM and NSP heads for a ``BertModel`` that has none (N(0, std^2), zeros, ones)."""
    generator = torch.Generator().manual_seed(seed)
    h, std = config.hidden_size, config.init_method_std

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    return {
        "bert.pooler.dense.weight": normal(h, h), "bert.pooler.dense.bias": torch.zeros(h),
        "cls.predictions.transform.dense.weight": normal(h, h), "cls.predictions.transform.dense.bias": torch.zeros(h),
        "cls.predictions.transform.LayerNorm.weight": torch.ones(h),
        "cls.predictions.transform.LayerNorm.bias": torch.zeros(h),
        "cls.predictions.bias": torch.zeros(config.unpadded_vocab_size or config.vocab_size),
        "cls.seq_relationship.weight": normal(2, h), "cls.seq_relationship.bias": torch.zeros(2),
    }


def hf_to_full(model_type: str, hf_state: dict[str, torch.Tensor], config: TransformerConfig, where: str,
               seed: int = 1234) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full tensors in our names from a Hugging Face state dict, and the heads that were newly initialised
    (a ``BertModel`` carries no pretraining heads)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in hf_state.items()}
    _check_tied(state, where)
    fresh: list[str] = []
    if model_type == "gpt2":
        if not any(k.startswith("transformer.") for k in state):
            state = {f"transformer.{k}": v for k, v in state.items()}  # a bare GPT2Model
        used, full = set(), {}
        for ours, theirs in _GPT2_TOP.items():
            full[ours] = _take(state, theirs, used, where)
        for i in range(config.num_layers):
            for ours, (theirs, transposed) in _GPT2_LAYER.items():
                tensor = _take(state, f"transformer.h.{i}.{theirs}", used, where)
                full[f"transformer.layers.{i}.{ours}"] = tensor.t().contiguous() if transposed else tensor
    else:
        if not any(k.startswith("bert.") for k in state):
            state = {f"bert.{k}": v for k, v in state.items()}  # a bare BertModel
        heads = _fresh_bert_heads(config, seed)
        fresh = sorted(k for k in heads if k not in state)
        state = {**{k: heads[k] for k in fresh}, **state}
        try:
            full = hf_bert_to_megatron(state, config.num_layers)
        except KeyError as err:
            raise ConversionError(f"{where}: the weights have no {err.args[0]}") from None
        used = _bert_used_keys(config.num_layers)
    left = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if left:
        raise ConversionError(f"{where}: tensors this converter does not know: {', '.join(left[:4])}"
                              f"{' ...' if len(left) > 4 else ''}")
    for name in [n for n in full if n in ("word_embeddings.weight", "embeddings.word_embeddings.weight",
                                          "lm_head.bias")]:
        full[name] = _resize_rows(full[name], config.vocab_size)
    return full, fresh


def _check_tied(state: dict[str, torch.Tensor], where: str) -> None:
    """The output layers here are tied to the word embedding; an untied one would be dropped silently."""
    for output, embedding in (("lm_head.weight", "transformer.wte.weight"), ("lm_head.weight", "wte.weight"),
                              ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")):
        if output in state and embedding in state and not torch.equal(state[output], state[embedding]):
            raise ConversionError(f"{where}: {output} is not tied to {embedding}; only models with tied output "
                                  "embeddings convert")


def _take(state: dict[str, torch.Tensor], key: str, used: set[str], where: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{where}: the weights have no {key}")
    used.add(key)
    return state[key]


def _bert_used_keys(num_layers: int) -> set[str]:
    keys = set(_HF_TOP.values())
    for i in range(num_layers):
        prefix = f"bert.encoder.layer.{i}."
        keys |= {prefix + theirs for theirs in _HF_LAYER.values()}
        keys |= {f"{prefix}attention.self.{n}.{k}" for n in ("query", "key", "value") for k in ("weight", "bias")}
    return keys


def full_to_hf(model_type: str, full: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Hugging Face ``GPT2LMHeadModel`` / ``BertForPreTraining`` tensors (tied copies left out, the
    vocabulary cut back to the tokenizer's size) from full tensors in our names."""
    vocab = config.unpadded_vocab_size or config.vocab_size
    out: dict[str, torch.Tensor] = {}
    if model_type == "gpt2":
        for ours, theirs in _GPT2_TOP.items():
            out[theirs] = full[ours]
        for i in range(config.num_layers):
            for ours, (theirs, transposed) in _GPT2_LAYER.items():
                tensor = full[f"transformer.layers.{i}.{ours}"]
                out[f"transformer.h.{i}.{theirs}"] = tensor.t() if transposed else tensor
        out["transformer.wte.weight"] = out["transformer.wte.weight"][:vocab]
    else:
        for ours, theirs in _HF_TOP.items():
            out[theirs] = full[ours]
        for i in range(config.num_layers):
            prefix = f"bert.encoder.layer.{i}."
            for ours, theirs in _HF_LAYER.items():
                out[prefix + theirs] = full[f"transformer.layers.{i}.{ours}"]
            for kind in ("weight", "bias"):
                q, k, v = full[f"transformer.layers.{i}.attention.query_key_value.{kind}"].chunk(3)
                for name, tensor in zip(("query", "key", "value"), (q, k, v)):
                    out[f"{prefix}attention.self.{name}.{kind}"] = tensor
        for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
            out[key] = out[key][:vocab]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def hf_config_from(model_type: str, config: TransformerConfig) -> dict[str, Any]:
    """A ``config.json`` that ``transformers`` builds the same model from."""
    vocab = config.unpadded_vocab_size or config.vocab_size
    if model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": config.max_sequence_length, "n_embd": config.hidden_size, "n_layer": config.num_layers,
            "n_head": config.num_attention_heads, "n_inner": config.intermediate_size,
            "activation_function": "gelu" if config.exact_gelu else "gelu_new",
            "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
            "attn_pdrop": config.attention_dropout, "layer_norm_epsilon": config.layernorm_epsilon,
            "initializer_range": config.init_method_std, "tie_word_embeddings": True,
            "bos_token_id": vocab - 1, "eos_token_id": vocab - 1,
        }
    return {
        "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": vocab,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads, "intermediate_size": config.ffn_hidden_size,
        "hidden_act": "gelu" if config.exact_gelu else "gelu_new",
        "hidden_dropout_prob": config.hidden_dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_sequence_length, "type_vocab_size": config.num_tokentypes,
        "layer_norm_eps": config.layernorm_epsilon, "initializer_range": config.init_method_std,
        "pad_token_id": 0, "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }


def import_hf(hf_dir: str, target: int, divisible_by: int = 128, seed: int = 1234
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """A Hugging Face folder as per-rank ``release`` states at model-parallel size ``target``, and the
    names of newly initialised heads."""
    hf_config = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    model_type = hf_model_type(hf_config, where)
    vocab = int(_need(hf_config, "vocab_size", where))
    config = config_from_hf(hf_config, model_type, pad_vocab_size(vocab, divisible_by, target), where)
    check_divisible(config, target, where)
    hf_state = read_hf_weights(hf_dir)
    full, fresh = hf_to_full(model_type, hf_state, config, hf_dir, seed)
    if model_type == "gpt2":
        args: dict[str, Any] = {"tokenizer_type": "GPT2BPETokenizer"}
    else:
        cased = hf_config.get("do_lower_case") is False
        args = {"tokenizer_type": "BertWordPieceTokenizer",
                "tokenizer_model_type": "bert-base-cased" if cased else "bert-base-uncased"}
    args.update(make_vocab_size_divisible_by=divisible_by, imported_from=os.path.abspath(hf_dir))
    return release_states(model_type, config, full, target, args, hf_dir), fresh


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------


def check_new_output(path: str, flag: str) -> None:
    """Refuse an output that exists (other than as an empty directory): a conversion never overwrites."""
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ConversionError(f"{flag} {path}: already exists and is not empty; choose a new directory "
                              "(nothing was written)")


@contextlib.contextmanager
def new_output_dir(path: str, flag: str) -> Iterator[str]:
    """A staging folder beside ``path`` that becomes ``path`` only when the block succeeds."""
    check_new_output(path, flag)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"{flag} {path}: cannot create {parent} ({err.strerror})") from None
    remove_orphans(parent)  # staging folders of conversions that were killed
    staging = temporary_path(path)
    os.makedirs(staging)
    try:
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.replace(staging, path)
    except OSError as err:  # a full disk, a lost mount: the partial output goes, the line says so
        raise ConversionError(f"{flag} {path}: writing failed ({err.strerror or err}); nothing was written") \
            from None
    finally:
        if os.path.isdir(staging):
            import shutil

            shutil.rmtree(staging, ignore_errors=True)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# Megatron-LM 2019 checkpoints
# ---------------------------------------------------------------------------------------------

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
    theirs_to_ours = {theirs: ours for ours, theirs in _HF_TOP.items()}
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
            ours = {theirs: o for o, theirs in _HF_LAYER.items()}.get(rest)
            if ours is None:
                raise ConversionError(f"{where}: unknown tensor {key}")
            out[f"transformer.layers.{index}.{ours}"] = value
    return "bert", out


def import_megatron2019(load_dir: str, target: int = 1, vocab_size: int | None = None,
                        num_attention_heads: int | None = None, divisible_by: int = 128
                        ) -> tuple[list[dict[str, Any]], str]:
    """A 2019 Megatron-LM checkpoint (full pickles: call only for files you trust) as per-rank
    ``release`` states of this toolkit at size ``target``, and a line saying how the vocabulary was read."""
    import pickle


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
    layers = 1 + max(int(k.split(".")[2]) for k in first if k.startswith("transformer.layers."))
    shape = dict(num_layers=layers, hidden_size=word.shape[1], num_attention_heads=int(heads),
                 vocab_size=word.shape[0] * mp,
                 max_sequence_length=first[("" if model_type == "gpt2" else "embeddings.")
                                           + "position_embeddings.weight"].shape[0],
                 intermediate_size=first["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0] * mp)
    if namespace.get("layernorm_epsilon"):
        shape["layernorm_epsilon"] = float(namespace["layernorm_epsilon"])
    config = bert_config(**shape) if model_type == "bert" else TransformerConfig(**shape)
    layout = model_layout(model_type, config)
    full = _merge(parts, layout)
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
    full = _repad(full, layout, padded)
    args = {"imported_from": os.path.abspath(load_dir), "make_vocab_size_divisible_by": divisible_by,
            **{k: namespace[k] for k in ("tokenizer_type", "tokenizer_model_type", "vocab_file", "merge_file")
               if isinstance(namespace.get(k), str)}}
    return release_states(model_type, config, full, target, args, load_dir), f"{how}, padded to {padded}"
