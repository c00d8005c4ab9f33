"""Import a checkpoint written by the original 2019 Megatron-LM code.

    python tools/import_megatron2019.py --load checkpoints/gpt2_345m_2019 --save checkpoints/gpt2_345m \\
        --trust-pickle [--target-model-parallel-size 1] [--vocab-size 50257] [--num-attention-heads 16]

The 2019 files (``iter_*/mp_rank_XX/model_optim_rng.pt`` or ``release/...``, the tracker beside them)
are full Python pickles: the weights sit next to a pickled argparse namespace and numpy/python rng
states, and unpickling such a file can run any code it names. So the tool refuses to read them
unless ``--trust-pickle`` says you trust where they came from. It keeps only the model weights
(GPT2's flat names, which are ours; BERT's ``bert.*``/``cls.*`` names with the fused
``attention.self.query_key_value``; NGC's 2020 nested GPT-2 layout too) and writes a safe,
weights-only ``release`` checkpoint of this toolkit at the target size, with its config stored.

The vocabulary: 2019 padded it to a multiple of ``--make-vocab-size-divisible-by`` times the
model-parallel size (50257 -> 50304 at size 1, 50432 at size 2); this toolkit pads to a multiple
of their least common multiple and gives padded entries no probability. The tokenizer's real size
is recognised from the padding for GPT-2 (50257) and BERT (30522 uncased, 28996 cased), else pass
``--vocab-size``. The number of heads comes from the stored namespace, else ``--num-attention-heads``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing import write_checkpoint_files  # noqa: E402
from conversion import ConversionError, check_new_output, import_megatron2019, new_output_dir  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="the 2019 checkpoint directory (with its tracker file)")
    parser.add_argument("--save", required=True, help="new directory for this toolkit's checkpoint")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of the 2019 files (it can run code: only for files you trust)")
    parser.add_argument("--target-model-parallel-size", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's (unpadded) vocabulary size")
    parser.add_argument("--num-attention-heads", type=int, default=None,
                        help="needed when the checkpoint stores no argument namespace")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args(argv)
    check_new_output(args.save, "--save")
    if not args.trust_pickle:
        raise ConversionError(f"{args.load}: 2019 checkpoints are full pickles (an argparse namespace and rng states "
                              "beside the weights) and unpickling can run code; pass --trust-pickle if you trust "
                              "where they came from")
    if args.target_model_parallel_size < 1:
        raise ConversionError(f"--target-model-parallel-size must be at least 1, got {args.target_model_parallel_size}")
    states, vocab = import_megatron2019(args.load, args.target_model_parallel_size, args.vocab_size,
                                        args.num_attention_heads, args.make_vocab_size_divisible_by)
    with new_output_dir(args.save, "--save") as staging:
        write_checkpoint_files(staging, "release", states)
    config = states[0]["config"]
    kind = "BERT" if config["post_layernorm"] else "GPT2"
    print(f"imported the 2019 {kind} checkpoint {args.load} to {args.save}: {config['num_layers']} layers, hidden "
          f"{config['hidden_size']}, {config['num_attention_heads']} heads, {vocab}, model-parallel size "
          f"{args.target_model_parallel_size} (weights only; optimizer and rng states left behind)")


if __name__ == "__main__":
    from initialize import run_main

    run_main(main)
