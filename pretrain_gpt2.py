"""Pretrain GPT2: the model, its data and its forward step; the loop lives in training.py."""

from __future__ import annotations

import torch

from arguments import get_args
from data_utils import build_gpt2_datasets, make_tokenizer
from data_utils.blending import build_indexed_datasets, gpt2_member
from data_utils.npy_dataset import build_npy_datasets
from errors import ArgumentError
from initialize import run_main
from metrics import print_run_summary
from model import GPT2Model, TransformerConfig, gpt2_forward_step
from training import pretrain, samples_needed


def model_provider(config: TransformerConfig) -> GPT2Model:
    """GPT2 of ``config``: TransformerConfig's defaults are GPT2's (pre-LN, tanh GELU, causal, and the
    residual output projections scaled by 1/sqrt(2L))."""
    return GPT2Model(config, parallel_output=True)


def data_provider(args):
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    if args.use_npy_data_loader:
        return (tokenizer, *build_npy_datasets(args.train_data_path, args.val_data_path, args.test_data_path,
                                               args.input_data_sizes_file, args.seq_length, args.cache_dir,
                                               args.trust_pickle, eval_seq_length=args.eval_seq_length))
    train, valid, test = build_gpt2_datasets(
        args.train_data or [], args.valid_data, args.test_data, args.split, args.seq_length, tokenizer,
        args.lazy_loader, args.cache_dir, args.seed, args.text_key, eval_text_key=args.eval_text_key,
        eval_seq_length=args.eval_seq_length,
    )
    if args.data_path:
        blends = build_indexed_datasets(
            args.data_path, args.split, args.seed, samples_needed(args),
            gpt2_member(args.seq_length, tokenizer, args.eval_seq_length),
            tokenizer, gpt2=True, valid_given=bool(args.valid_data), test_given=bool(args.test_data),
            shuffle=args.shuffle, data_cache_path=args.data_cache_path, cache_dir=args.cache_dir,
        )
        train, valid, test = blends[0], valid or blends[1], test or blends[2]
    return tokenizer, train, valid, test


def forward_step_provider(args, tokenizer, device: torch.device):
    return gpt2_forward_step(tokenizer.eod, device, args.reset_position_ids, args.reset_attention_mask,
                             args.eod_mask_loss)


def run(args) -> dict:
    """Pretrain GPT2 on ``args`` (from ``get_args``); the run's results."""
    if args.pretrained_bert:
        raise ArgumentError("--pretrained-bert starts BERT (pretrain_bert.py); to start GPT2 from a Hugging Face "
                            "GPT-2 folder pass --load DIR --load-openai")
    return pretrain(args, model_provider, data_provider, forward_step_provider)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv, description="GPT2 pretraining", model="gpt2")
    results = run(args)
    print_run_summary(results, lambda valid: f"validation perplexity {valid['ppl']:.2f}")


if __name__ == "__main__":
    run_main(main)
