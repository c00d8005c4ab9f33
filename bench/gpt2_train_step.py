"""Time one GPT2 training step (forward, backward, AdamW) here and in Hugging Face transformers.

Both models get the same shape, no dropout and the same batch; steps alternate between the two so
that a noisy machine slows both alike. Prints the median step time of each and their ratio
(ours / transformers: below 1 means we are faster), plus tokens/s and, on CUDA, model FLOPs
utilisation against --peak-tflops.

    python bench/gpt2_train_step.py --num-layers 4 --hidden-size 256 --heads 4 --seq-length 128
    python bench/gpt2_train_step.py --device cuda --dtype bf16 --num-layers 24 --hidden-size 1024 --heads 16 \\
        --seq-length 1024 --batch-size 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpu  # noqa: E402
from bench.harness import add_common_args, compare, init_single_process  # noqa: E402
from model import GPT2Model, TransformerConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, layers=4, hidden=256, heads=4, vocab=50304, seq=128, batch=4)
    return parser.parse_args()


def build_ours(args) -> torch.nn.Module:
    config = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=args.heads, vocab_size=args.vocab_size,
                               max_sequence_length=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0)
    return GPT2Model(config)


def build_hf(args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.num_layers, n_embd=args.hidden_size, n_head=args.heads,
                        vocab_size=args.vocab_size, n_positions=args.seq_length, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def step_ours(model, tokens, labels, positions):
    return mpu.vocab_parallel_cross_entropy(model(tokens, positions), labels).mean()


def step_hf(model, tokens, labels, positions):
    logits = model(input_ids=tokens, position_ids=positions).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    init_single_process()
    models = {"ours": build_ours(args).to(device), "transformers": build_hf(args).to(device)}
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length + 1), device=device)
    positions = torch.arange(args.seq_length, device=device).expand(args.batch_size, -1)
    compare(args, models, {"ours": step_ours, "transformers": step_hf}, (tokens[:, :-1], tokens[:, 1:], positions))


if __name__ == "__main__":
    main()
