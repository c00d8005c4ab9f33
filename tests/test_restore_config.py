"""The model config is decided once (restore.decide_model_config) from the flags, the tokenizer and the
checkpoint's stored config; the parsed arguments are read-only; the vocabulary-padding rule is one."""

from __future__ import annotations

import dataclasses

import pytest

from arguments import get_args
from errors import ArgumentError, CheckpointError
from model import BERT_DEFAULTS, TransformerConfig, pad_vocab_size, padding_multiple, repad_vocab_size
from restore import decide_model_config, decide_shape

STORED = dataclasses.asdict(TransformerConfig(num_layers=3, hidden_size=96, num_attention_heads=6, vocab_size=256,
                                              max_sequence_length=80, layernorm_epsilon=1e-6,
                                              unpadded_vocab_size=250))


def test_arguments_are_read_only_after_parsing():
    args = get_args(["--num-layers", "2"])
    with pytest.raises(AttributeError, match="read-only"):
        args.num_layers = 4
    with pytest.raises(AttributeError, match="read-only"):
        args.unpadded_vocab_size = 5
    assert args.num_layers == 2 and not hasattr(args, "unpadded_vocab_size")


def test_shape_flags_left_out_are_none_until_decided():
    args = get_args([])
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.max_position_embeddings,
            args.layernorm_epsilon) == (None, None, None, None, None)
    config = decide_model_config(args, vocab_size=50257)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.max_sequence_length) == \
        (24, 1024, 16, 512)
    assert config.layernorm_epsilon == 1e-5 and config.intermediate_size is None
    assert (config.vocab_size, config.unpadded_vocab_size) == (50304, 50257)


def test_the_flags_the_checkpoint_and_the_model_family_each_decide_what_the_others_leave():
    args = get_args(["--num-layers", "3", "--load", "ckpt", "--seq-length", "64", "--hidden-dropout", "0.25"])
    config = decide_model_config(args, 250, STORED, "ckpt")
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.max_sequence_length) == \
        (3, 96, 6, 80)
    assert config.layernorm_epsilon == 1e-6  # the checkpoint's, not the default
    assert config.vocab_size == 256  # the checkpoint's padding for the same tokenizer, not pad_vocab_size's 256+
    assert config.hidden_dropout == 0.25 and config.unpadded_vocab_size == 250
    bert = decide_model_config(get_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"]),
                               100, model_defaults=BERT_DEFAULTS)
    assert bert.post_layernorm and bert.num_tokentypes == 2 and bert.layernorm_epsilon == 1e-12
    eps = decide_model_config(get_args(["--layernorm-epsilon", "1e-3", "--num-attention-heads", "4",
                                        "--hidden-size", "32"]), 100, model_defaults=BERT_DEFAULTS)
    assert eps.layernorm_epsilon == 1e-3  # a given flag beats the family's default


def test_another_tokenizer_is_padded_by_the_rule_not_the_checkpoint():
    args = get_args(["--load", "ckpt", "--seq-length", "64"])
    assert decide_model_config(args, 300, STORED, "ckpt").vocab_size == pad_vocab_size(300, 128, 1) == 384


@pytest.mark.parametrize("argv, error, fragment", [
    (["--num-layers", "4"], CheckpointError, "--num-layers 4 contradicts the checkpoint in ckpt, which has "
                                             "--num-layers 3"),
    (["--intermediate-size", "100"], CheckpointError, "--intermediate-size 100 contradicts the checkpoint in ckpt, "
                                                      "which has --intermediate-size 384"),
    (["--seq-length", "81"], ArgumentError, "--seq-length 81 exceeds --max-position-embeddings 80 (the checkpoint's "
                                            "in ckpt)"),
])
def test_a_flag_the_checkpoint_contradicts_is_one_clear_error(argv, error, fragment):
    args = get_args(["--load", "ckpt", *argv])
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        decide_shape(args, STORED, "ckpt")


def test_without_a_checkpoint_the_sequence_is_checked_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args(["--seq-length", "600"])
    assert exit_info.value.code == 2
    assert "--seq-length 600 exceeds --max-position-embeddings 512" in capsys.readouterr().err
    assert get_args(["--seq-length", "600", "--load", "somewhere"]).seq_length == 600  # the checkpoint decides


def test_one_padding_rule_with_the_2019_variant():
    assert padding_multiple(128, 2) == 128 and padding_multiple(128, 2, rule_2019=True) == 256
    assert pad_vocab_size(50257, 128, 1) == pad_vocab_size(50257, 128, 8) == 50304
    assert pad_vocab_size(50257, 128, 2, rule_2019=True) == 50432
    assert pad_vocab_size(50257, 128, 5) == 50560  # lcm(128, 5) = 640
    assert repad_vocab_size(50304, 50257, 4, 128) == 50304  # size 4 splits it: unchanged
    assert repad_vocab_size(50304, 50257, 5, 128) == 50560  # re-padded from the real size
    assert repad_vocab_size(100, None, 3, 1) == 102
