"""Pretrain GPT2: the model, its data and its forward step; the loop lives in training.py."""

from __future__ import annotations

import torch

import mpu
from arguments import get_args, transformer_kwargs
from data_utils import build_gpt2_datasets, make_tokenizer
from data_utils.blending import build_indexed_datasets, gpt2_member
from data_utils.npy_dataset import build_npy_datasets
from model import GPT2Model, TransformerConfig, get_masks_and_position_ids
from training import pretrain, print_run_summary, run_main, samples_needed


def model_provider(args, padded_vocab_size: int) -> GPT2Model:
    # GPT2 always scales the residual output projections by 1/sqrt(2L).
    config = TransformerConfig(vocab_size=padded_vocab_size, scaled_init=True, **transformer_kwargs(args))
    return GPT2Model(config, parallel_output=True)


def data_provider(args):
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    if args.use_npy_data_loader:
        return (tokenizer, *build_npy_datasets(args.train_data_path, args.val_data_path, args.test_data_path,
                                               args.input_data_sizes_file, args.seq_length, args.cache_dir,
                                               args.trust_pickle))
    train, valid, test = build_gpt2_datasets(
        args.train_data or [], args.valid_data, args.test_data, args.split, args.seq_length, tokenizer,
        args.lazy_loader, args.cache_dir, args.seed, args.text_key, eval_text_key=args.eval_text_key,
    )
    if args.data_path:
        blends = build_indexed_datasets(
            args.data_path, args.split, args.seed, samples_needed(args), gpt2_member(args.seq_length, tokenizer),
            tokenizer, gpt2=True, valid_given=bool(args.valid_data), test_given=bool(args.test_data),
            shuffle=args.shuffle, data_cache_path=args.data_cache_path, cache_dir=args.cache_dir,
        )
        train, valid, test = blends[0], valid or blends[1], test or blends[2]
    return tokenizer, train, valid, test


def forward_step_provider(args, tokenizer, device: torch.device):
    eod = tokenizer.eod

    def forward_step(batch, model):
        text = mpu.broadcast_data(["text"], batch, torch.int64)["text"].to(device)  # (b, s + 1)
        tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
        attention_mask, position_ids = get_masks_and_position_ids(
            tokens, eod, args.reset_position_ids, args.reset_attention_mask
        )
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=device)
        if args.eod_mask_loss:
            loss_mask[tokens == eod] = 0.0
        logits = model(tokens, position_ids, attention_mask)  # (b, s, V/p)
        losses = mpu.vocab_parallel_cross_entropy(logits, labels)
        loss = (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        return loss, {"lm_loss": loss.detach()}

    return forward_step


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv, description="GPT2 pretraining")
    results = pretrain(args, model_provider, data_provider, forward_step_provider)
    print_run_summary(results, lambda valid: f"validation perplexity {valid['ppl']:.2f}")


if __name__ == "__main__":
    run_main(main)
