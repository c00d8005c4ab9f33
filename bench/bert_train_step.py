"""Time one BERT pretraining step (MLM + NSP forward, backward, AdamW) here and in Hugging Face transformers.

Both models get the same shape, no dropout and the same batch (15% of the tokens predicted, a
padded tail on half the samples); steps alternate between the two so that a noisy machine slows
both alike. Prints the median step time of each and their ratio (ours / transformers: below 1 means
we are faster), plus tokens/s and, on CUDA, model FLOPs utilisation against --peak-tflops.
``transformers``' ``BertForPreTraining`` runs its LM head on every position; ours runs it on the
predicted ones alone (``--full-lm-head`` runs it everywhere too, to compare like with like).

    python bench/bert_train_step.py --num-layers 4 --hidden-size 256 --heads 4 --seq-length 128
    python bench/bert_train_step.py --device cuda --dtype bf16 --num-layers 24 --hidden-size 1024 --heads 16 \\
        --seq-length 512 --batch-size 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpu  # noqa: E402
from bench.harness import add_common_args, compare, init_single_process  # noqa: E402
from model import BertModel, bert_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, layers=4, hidden=256, heads=4, vocab=30592, seq=128, batch=8)
    parser.add_argument("--full-lm-head", action="store_true", help="run our LM head on every position too")
    return parser.parse_args()


def build_ours(args) -> torch.nn.Module:
    config = bert_config(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                         vocab_size=args.vocab_size, max_sequence_length=args.seq_length, hidden_dropout=0.0,
                         attention_dropout=0.0)
    return BertModel(config)


def build_hf(args) -> torch.nn.Module:
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
                        max_position_embeddings=args.seq_length, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForPreTraining(config)


def make_batch(args, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.seq_length
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=gen)
    types = (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()
    keep = torch.ones(b, s, dtype=torch.long)
    keep[::2, 3 * s // 4:] = 0
    predict = (torch.rand(b, s, generator=gen) < 0.15) & keep.bool()
    labels = torch.where(predict, torch.randint(0, args.vocab_size, (b, s), generator=gen), -100)
    is_random = torch.randint(0, 2, (b,), generator=gen)
    return tuple(t.to(device) for t in (tokens, types, keep, predict, labels, is_random))


def step_ours(full_head: bool):
    def step(model, tokens, types, keep, predict, labels, is_random):
        lm, nsp = model(tokens, types, keep, None if full_head else predict)
        lm_losses = mpu.vocab_parallel_cross_entropy(lm, labels.clamp(min=0) if full_head else labels[predict])
        lm_loss = (lm_losses * predict).sum() / predict.sum() if full_head else lm_losses.mean()
        return lm_loss + F.cross_entropy(nsp.float(), is_random)

    return step


def step_hf(model, tokens, types, keep, predict, labels, is_random):
    out = model(input_ids=tokens, token_type_ids=types, attention_mask=keep)
    lm_loss = F.cross_entropy(out.prediction_logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return lm_loss + F.cross_entropy(out.seq_relationship_logits.float(), is_random)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    init_single_process()
    models = {"ours": build_ours(args).to(device), "transformers": build_hf(args).to(device)}
    compare(args, models, {"ours": step_ours(args.full_lm_head), "transformers": step_hf}, make_batch(args, device))


if __name__ == "__main__":
    main()
