"""Pretrain BERT: the model, its data and its forward step; the loop lives in training.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mpu
from arguments import get_args
from data_utils import build_bert_datasets, build_tfrecord_datasets, make_tokenizer, resolve_corpora
from data_utils.blending import bert_member, build_indexed_datasets
from initialize import run_main
from metrics import print_run_summary
from model import BERT_DEFAULTS, BertModel, TransformerConfig
from training import pretrain, samples_needed

BATCH_KEYS = ["text", "types", "is_random", "mask", "mask_labels", "pad_mask"]
FLAG_DEFAULTS = {"tokenizer_type": "BertWordPieceTokenizer"}


def model_provider(config: TransformerConfig) -> BertModel:
    """BERT of ``config`` (``model.BERT_DEFAULTS`` under the flags and the checkpoint's shape)."""
    return BertModel(config, parallel_output=True)


def data_provider(args):
    sentencepiece_corpus = None
    if args.tokenizer_type == "SentencePieceTokenizer" and not args.use_tfrecords:
        sentencepiece_corpus = resolve_corpora(args.train_data or [], args.cache_dir)  # trained on when absent
    tokenizer = make_tokenizer(
        args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir, model_type=args.tokenizer_model_type,
        tokenizer_path=args.tokenizer_path, vocab_size=args.vocab_size, train_files=sentencepiece_corpus,
        text_key=args.text_key,
    )
    if args.use_tfrecords:
        datasets = build_tfrecord_datasets(
            args.train_data or [], args.valid_data, args.test_data, args.seq_length, args.max_preds_per_seq,
            mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(), args.eval_seq_length,
            args.eval_max_preds_per_seq,
        )
    else:
        datasets = build_bert_datasets(
            args.train_data or [], args.valid_data, args.test_data, args.split, args.seq_length,
            args.max_preds_per_seq, tokenizer, args.lazy_loader, args.cache_dir, args.seed, args.text_key,
            args.presplit_sentences, eval_text_key=args.eval_text_key, eval_seq_length=args.eval_seq_length,
            eval_max_preds_per_seq=args.eval_max_preds_per_seq,
        )
    if args.data_path:
        blends = build_indexed_datasets(
            args.data_path, args.split, args.seed, samples_needed(args),
            bert_member(args.seq_length, args.max_preds_per_seq, tokenizer, args.seed, args.eval_seq_length,
                        args.eval_max_preds_per_seq), tokenizer, gpt2=False,
            valid_given=bool(args.valid_data), test_given=bool(args.test_data), shuffle=args.shuffle,
            data_cache_path=args.data_cache_path, cache_dir=args.cache_dir,
        )
        datasets = (blends[0], datasets[1] or blends[1], datasets[2] or blends[2])
    return (tokenizer, *datasets)


def _all_ranks_sum(count: torch.Tensor) -> torch.Tensor:
    """``count`` summed over every rank (as float32 on the collective device, back on ``count``'s)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return count.float()
    total = count.to(mpu.collective_device(), torch.float32)
    dist.all_reduce(total)
    return total.to(count.device)


class BertForwardStep:
    """BERT's forward step: masked-LM loss plus next-sentence loss.

    The masked-LM loss is the mean over every predicted token of the global batch, whatever its split
    over data-parallel ranks and micro-batches: data parallelism averages gradients over ranks and the
    training step averages micro-batches, so each micro-batch's loss is its sum times (ranks x
    micro-batches) over the global count. ``start_iteration`` (called by ``training.train_step`` with
    the iteration's micro-batches) counts the predicted tokens of the whole global batch, in one
    collective; a forward without it (evaluation) counts its own batch over the data-parallel ranks.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._count: torch.Tensor | None = None  # predicted tokens of the current global batch
        self._micro_batches = 1
        self._left = 0  # forwards of the current iteration still to come

    def start_iteration(self, batches: list) -> None:
        """Count the predicted tokens of this iteration's micro-batches on all ranks together. Only the
        first rank of each model-parallel group holds data (counted on the first pipeline stage only: every
        stage loads the same batches), so the world's sum is the global batch's."""
        mine = sum(int(batch["mask"].sum()) for batch in batches if batch is not None)
        if not mpu.is_pipeline_first_stage(ignore_virtual=True):
            mine = 0
        self._count = _all_ranks_sum(torch.tensor(float(mine))).to(self.device).clamp(min=1.0)
        self._micro_batches = self._left = len(batches)

    def _global_count(self, lm_positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self._left > 0:
            self._left -= 1
            return self._count, self._micro_batches
        count = lm_positions.sum().float()
        if mpu.get_data_parallel_world_size() > 1:
            group = mpu.get_data_parallel_group()
            total = count.to(mpu.collective_device(group))
            dist.all_reduce(total, group=group)
            count = total.to(count.device)
        return count.clamp(min=1.0), 1

    def __call__(self, batch, model):
        data = {k: v.to(self.device) for k, v in mpu.broadcast_data(BATCH_KEYS, batch, torch.int64).items()}
        lm_positions = data["mask"].bool()  # (b, s): the tokens to predict
        output = model(data["text"], data["types"], 1 - data["pad_mask"], lm_positions)
        if not mpu.is_pipeline_last_stage():
            return output, {}  # a pipeline stage's hidden states, for the next stage
        lm_logits, nsp_logits = output
        losses = mpu.vocab_parallel_cross_entropy(lm_logits, data["mask_labels"][lm_positions])  # (m,)
        count, micro_batches = self._global_count(lm_positions)
        lm_loss = losses.sum() * (mpu.get_data_parallel_world_size() * micro_batches) / count
        nsp_loss = F.cross_entropy(nsp_logits.float(), data["is_random"])
        return lm_loss + nsp_loss, {"lm_loss": lm_loss.detach(), "nsp_loss": nsp_loss.detach()}


def forward_step_provider(args, tokenizer, device: torch.device) -> BertForwardStep:
    return BertForwardStep(device)


def model_defaults(args) -> dict:
    """The model settings BERT uses where neither a flag nor a checkpoint decides (``model.BERT_DEFAULTS``,
    and ``--deep-init``'s scaled initialization)."""
    return {**BERT_DEFAULTS, "scaled_init": args.deep_init}


def run(args) -> dict:
    """Pretrain BERT on ``args`` (from ``get_args(defaults=FLAG_DEFAULTS)``); the run's results."""
    return pretrain(args, model_provider, data_provider, forward_step_provider, model_defaults(args))


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv, description="BERT pretraining", defaults=FLAG_DEFAULTS, model="bert")
    results = run(args)
    print_run_summary(results, lambda v: f"validation lm loss {v['lm_loss']:.4f}, nsp loss {v['nsp_loss']:.4f}")


if __name__ == "__main__":
    run_main(main)
