"""Hugging Face GPT2 and BERT checkpoints to and from this toolkit's, without ``transformers``.

A Hugging Face model folder is a ``config.json`` and weights in ``model.safetensors`` (or its sharded
index, or a ``pytorch_model.bin`` that loads with ``weights_only=True``). ``hf_to_full`` renames their
tensors to ours and reshapes where the layouts differ: GPT2's ``Conv1D`` stores ``(in, out)`` and is
transposed, BERT's separate query, key and value are stacked into our fused ``query_key_value``;
heads a bare ``BertModel`` lacks are newly initialised. ``full_to_hf`` and ``hf_config_from`` go the
other way, cutting the vocabulary back to the tokenizer's size. ``import_hf`` puts it together: a
folder in, per-rank ``release`` states at any model-parallel size out, the vocabulary padded by the
training rule (``model.pad_vocab_size``). Only ``safetensors`` is needed, and only when weights are
read or written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from errors import ConversionError
from model import TransformerConfig, bert_config, pad_vocab_size

from .layout import check_divisible, resize_rows
from .reshard import release_states

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
# BERT: ours -> Hugging Face ``BertForPreTraining``'s name, under ``bert.encoder.layer.{i}.`` for a layer's.
# The fused query/key/value is the one tensor made of three of theirs (``hf_bert_to_megatron``).
BERT_LAYER_NAMES = {
    "attention.dense.weight": "attention.output.dense.weight",
    "attention.dense.bias": "attention.output.dense.bias",
    "input_layernorm.weight": "attention.output.LayerNorm.weight",
    "input_layernorm.bias": "attention.output.LayerNorm.bias",
    "mlp.dense_h_to_4h.weight": "intermediate.dense.weight",
    "mlp.dense_h_to_4h.bias": "intermediate.dense.bias",
    "mlp.dense_4h_to_h.weight": "output.dense.weight",
    "mlp.dense_4h_to_h.bias": "output.dense.bias",
    "post_attention_layernorm.weight": "output.LayerNorm.weight",
    "post_attention_layernorm.bias": "output.LayerNorm.bias",
}
BERT_TOP_NAMES = {
    "embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.tokentype_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.layernorm.weight": "bert.embeddings.LayerNorm.weight",
    "embeddings.layernorm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layernorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layernorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
}
# Buffers and tied copies a Hugging Face file may carry that hold no weights of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "lm_head.weight",
                     "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
BERT_ARCHITECTURES = ("BertForPreTraining", "BertModel", "BertForMaskedLM")
# Tokenizer files a model folder may hold beside the weights; the tools copy them along, both ways.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


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
    except Exception as err:  # safetensors' SafetensorError (a truncated file) derives from Exception only
        if not isinstance(err, (OSError, ValueError, KeyError)) and type(err).__name__ != "SafetensorError":
            raise
        raise ConversionError(f"{hf_dir}: unreadable safetensors weights ({str(err).splitlines()[0]}); the file is "
                              "truncated or not safetensors: fetch it again") from None
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


def hf_bert_to_megatron(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) ``BertModel`` tensors from a Hugging Face ``BertForPreTraining`` state dict.

    Query, key and value are stacked into the fused ``query_key_value`` (``[Q; K; V]`` rows, which
    is the layout the stride-3 column-parallel split expects). The vocabulary keeps its size:
    ``hf_to_full`` pads it.
    """
    out = {ours: hf_state[theirs] for ours, theirs in BERT_TOP_NAMES.items()}
    for i in range(num_layers):
        prefix = f"bert.encoder.layer.{i}."
        for ours, theirs in BERT_LAYER_NAMES.items():
            out[f"transformer.layers.{i}.{ours}"] = hf_state[prefix + theirs]
        for kind in ("weight", "bias"):
            out[f"transformer.layers.{i}.attention.query_key_value.{kind}"] = torch.cat(
                [hf_state[f"{prefix}attention.self.{name}.{kind}"] for name in ("query", "key", "value")])
    return out


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
        full[name] = resize_rows(full[name], config.vocab_size)
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
    keys = set(BERT_TOP_NAMES.values())
    for i in range(num_layers):
        prefix = f"bert.encoder.layer.{i}."
        keys |= {prefix + theirs for theirs in BERT_LAYER_NAMES.values()}
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
        for ours, theirs in BERT_TOP_NAMES.items():
            out[theirs] = full[ours]
        for i in range(config.num_layers):
            prefix = f"bert.encoder.layer.{i}."
            for ours, theirs in BERT_LAYER_NAMES.items():
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
