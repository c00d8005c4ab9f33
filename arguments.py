"""The one argparse definition shared by every entry script, and the values derived from it.

Flag names and meanings follow Megatron-LM (2019) so that its command lines run unchanged.
``get_args()`` parses, validates and derives (world and data-parallel sizes, device, backend)
once; nothing changes the result afterwards.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from atomic import temporary_path
from data_utils.corpora import set_delimiter
from errors import ArgumentError
from flag_rules import FLOAT_RANGES, misplaced_flag
from microbatches import BatchSchedule
from parallel_layout import check_parallel_sizes


class Arguments(argparse.Namespace):
    """The parsed flags and the values derived from them; read-only once ``get_args`` returns it.

    Setting an attribute afterwards raises ``AttributeError``: decide a value once (e.g. the model
    config in ``restore.decide_model_config``) and pass it down instead of writing it here.
    """

    _sealed: set[int] = set()  # ids of the sealed instances (a Namespace keeps no private attributes)

    def seal(self) -> Arguments:
        Arguments._sealed.add(id(self))
        return self

    def __setattr__(self, name: str, value) -> None:
        if id(self) in Arguments._sealed:
            raise AttributeError(f"args.{name} is read-only after get_args; decide the value once and pass it "
                                 "down instead")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if id(self) in Arguments._sealed:
            raise AttributeError(f"args.{name} is read-only after get_args")
        super().__delattr__(name)

    def __del__(self) -> None:
        Arguments._sealed.discard(id(self))


def writable_directory(path: str, flag: str) -> None:
    """``path`` is a directory this process can write in, created if absent; else one ``ArgumentError``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ArgumentError(f"{flag} {path}: cannot create the directory ({err.strerror})") from None
    probe = temporary_path(os.path.join(path, "write-test"))  # host and pid: unique on a shared filesystem
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ArgumentError(f"{flag} {path}: not writable ({err.strerror}); choose a directory this run can "
                            "write to") from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model", "model shape and regularisation")
    # The shape flags default to None, "not given": with --load the checkpoint's value applies, without
    # it MODEL_SHAPE_DEFAULTS (restore.decide_model_config decides, once).
    group.add_argument("--num-layers", type=int, default=None,
                       help="number of transformer layers (default: the checkpoint's with --load, else 24)")
    group.add_argument("--hidden-size", type=int, default=None,
                       help="transformer hidden size (default: the checkpoint's with --load, else 1024)")
    group.add_argument("--num-attention-heads", type=int, default=None,
                       help="number of attention heads (default: the checkpoint's with --load, else 16)")
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="maximum sequence length the position embeddings cover (default: the checkpoint's "
                            "with --load, else 512)")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="SentencePieceTokenizer: vocabulary size of a model trained from --train-data "
                            "(default 30522); other tokenizers take it from their vocabulary file")
    group.add_argument("--intermediate-size", type=int, default=None,
                       help="width of the MLP's hidden layer (default 4 x --hidden-size)")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of lcm(this, model-parallel size)")
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="dropout on hidden states")
    group.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on attention probs")
    group.add_argument("--layernorm-epsilon", type=float, default=None,
                       help="LayerNorm epsilon (default: the checkpoint's with --load, else 1e-5; BERT's 1e-12 "
                            "in pretrain_bert.py)")
    group.add_argument("--init-method-std", type=float, default=0.02, help="std of normal initialisation")
    group.add_argument("--pretrained-bert", action="store_true",
                       help="BERT: start from the Hugging Face BERT folder --tokenizer-model-type names")
    group.add_argument("--deep-init", action="store_true",
                       help="BERT: scale residual output init by 1/sqrt(2*num_layers) as GPT2 does")
    group.add_argument("--checkpoint-activations", action="store_true",
                       help="recompute activations in backward to save memory")
    group.add_argument("--checkpoint-num-layers", type=int, default=1,
                       help="layers per activation-checkpointing chunk")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision", "mixed precision")
    group.add_argument("--fp16", action="store_true", help="train in fp16 with fp32 master weights")
    group.add_argument("--bf16", action="store_true", help="train in bf16 with fp32 master weights")
    group.add_argument("--fp32-embedding", action="store_true", help="keep embeddings in fp32 under --fp16")
    group.add_argument("--fp32-layernorm", action="store_true", help="keep LayerNorm in fp32 under --fp16")
    group.add_argument("--fp32-tokentypes", action="store_true",
                       help="BERT: keep the token-type embeddings in fp32 (GPT2 has none)")
    group.add_argument("--fp32-allreduce", action="store_true", help="all-reduce gradients in fp32")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="static loss scale; dynamic scaling when not given")
    group.add_argument("--initial-loss-scale", type=float, default=2.0**32,
                       help="starting dynamic loss scale")
    group.add_argument("--loss-scale-window", type=float, default=1000,
                       help="clean iterations before the dynamic scale grows")
    group.add_argument("--min-scale", type=float, default=1, help="lowest dynamic loss scale")
    group.add_argument("--hysteresis", type=int, default=2, help="overflows tolerated before the scale drops")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training", "optimisation and schedule")
    group.add_argument("--micro-batch-size", "--batch-size", dest="micro_batch_size", type=int, default=4,
                       help="samples per forward pass on each data-parallel rank (--batch-size is the 2019 name)")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="samples per optimiser step over all ranks (default: micro x data-parallel size; "
                            "more accumulates global / (micro x data-parallel) micro-batches)")
    group.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INC", "SAMPLES"),
                       help="grow the global batch from START by INC over the first SAMPLES samples")
    group.add_argument("--train-iters", type=int, default=1000000, help="total training iterations")
    group.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    group.add_argument("--min-lr", type=float, default=0.0, help="floor of the decayed learning rate")
    group.add_argument("--lr-decay-style", default="linear",
                       choices=["constant", "linear", "cosine", "exponential"], help="learning-rate decay")
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="iterations to decay over (default: --train-iters)")
    group.add_argument("--warmup", type=float, default=0.01,
                       help="warmup as a fraction of --lr-decay-iters")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    group.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    group.add_argument("--seed", type=int, default=1234, help="random seed")
    group.add_argument("--log-interval", type=int, default=100, help="iterations between log lines")
    group.add_argument("--log-dir", default=None, help="write metrics.jsonl (and TensorBoard events) here")
    group.add_argument("--log-timers", action="store_true",
                       help="time each phase (data, forward, backward, all-reduce, optimizer) with device "
                            "synchronisation, and measure the peak for MFU on CPU; off, the step stays asynchronous")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer layer (in place: checkpoint names stay the same); "
                            "the first iterations pay for compilation")
    group.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend for --compile (aot_eager checks graphs without generating code)")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="dense peak TFLOP/s for MFU (default: a GPU table, or measured on CPU with --log-timers)")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="save (with --save) and exit when the iteration is a multiple of this")
    group.add_argument("--eval-interval", type=int, default=1000, help="iterations between evaluations")
    group.add_argument("--eval-iters", type=int, default=100, help="batches per evaluation")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="save (with --save) and exit 0 once this many minutes of wall time have passed; "
                            "SIGTERM and SIGUSR1 do the same at any time (rerun the command to resume)")
    group.add_argument("--abort-on-nonfinite", action="store_true",
                       help="exit non-zero, saving nothing, when a step's loss or gradient norm is not finite "
                            "(default: skip that step on every rank and count it; fp16's dynamic loss scaling "
                            "keeps skipping overflows either way)")
    group.add_argument("--max-skipped-fraction", type=float, default=0.5,
                       help="stop with an error when more than this fraction of the last --skipped-window "
                            "steps were skipped (1 never stops)")
    group.add_argument("--skipped-window", type=int, default=100,
                       help="iterations over which --max-skipped-fraction is judged")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoint", "saving and loading")
    group.add_argument("--save", default=None, help="directory to save checkpoints to")
    group.add_argument("--save-interval", type=int, default=5000, help="iterations between checkpoints")
    group.add_argument("--no-save-optim", action="store_true", help="do not save optimizer state")
    group.add_argument("--no-save-rng", action="store_true", help="do not save RNG state")
    group.add_argument("--load", default=None, help="directory to load the latest checkpoint from")
    group.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state")
    group.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    group.add_argument("--finetune", action="store_true",
                       help="load model weights only and start at iteration 0")
    group.add_argument("--overwrite-checkpoints", action="store_true",
                       help="start a new run in a --save directory that holds another run's checkpoints "
                            "(refused without it: the classic forgotten --load)")
    group.add_argument("--load-openai", action="store_true",
                       help="--load is a Hugging Face GPT-2 folder (config.json + model.safetensors), converted "
                            "in memory; tools/hf_checkpoint.py import does it once")
    group.add_argument("--eval-hf", action="store_true", help="the same as --load-openai (the 2019 evaluation flag)")
    group.add_argument("--resume-dataloader", action="store_true",
                       help="continue the data order where the checkpoint left it")
    group.add_argument("--keep-last-checkpoints", type=int, default=None,
                       help="after each save, delete all but the newest K iter_* folders (never the tracked one)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed", "parallelism and devices")
    group.add_argument("--model-parallel-size", type=int, default=1, help="tensor model-parallel size")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                       help="pipeline stages: the layers split evenly, micro-batches in the 1F1B schedule")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="layers per chunk of the interleaved schedule (each stage holds several chunks)")
    group.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                       help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    group.add_argument("--DDP-impl", default="local", choices=["local", "torch"],
                       help="data-parallel implementation: all-reduce after backward, or torch's overlapping DDP")
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="shard the fp32 master weights and optimizer state over the data-parallel group "
                            "(reduce-scatter the gradients, update the shard, all-gather the weights)")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="--DDP-impl local: start each bucket's gradient all-reduce during backward, as soon as "
                            "its gradients are ready, instead of after backward")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="split LayerNorm, dropout and residual activations along the sequence over the "
                            "model-parallel group (needs --model-parallel-size above 1)")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: cuda when available")
    group.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                       help="how long a collective waits for a rank that stopped answering before the job "
                            "exits with an error (data preparation waits at least DATA_PREP_TIMEOUT_MIN)")
    group.add_argument("--local_rank", "--local-rank", type=int, default=None,
                       help="set by torch.distributed.launch (torchrun sets LOCAL_RANK instead)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data", "corpora and tokenization")
    group.add_argument("--train-data", nargs="+", default=None,
                       help="corpus aliases (data_utils/corpora.py) or loose-json paths")
    group.add_argument("--valid-data", nargs="*", default=None, help="validation corpora")
    group.add_argument("--test-data", nargs="*", default=None, help="test corpora")
    group.add_argument("--split", default="1000,1,1", help="train,valid,test proportions of --train-data")
    group.add_argument("--text-key", default="text", help="json key (csv/tsv: column) holding the document text")
    group.add_argument("--eval-text-key", default=None,
                       help="the same for --valid-data/--test-data and evaluation data (default --text-key)")
    group.add_argument("--loose-json", action="store_true",
                       help="accepted (2019): loose json is the default; a file starting with '[' is a json array")
    group.add_argument("--delim", default=None,
                       help="delimiter of .csv/.tsv corpora (default ',' for .csv, tab for .tsv; '\\t' means tab)")
    group.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                       help="train on the samples in a seeded random order each epoch (--no-shuffle: in order)")
    group.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                       help="indexed datasets PREFIX.bin/.idx (tools/preprocess_data.py, Megatron-Core format) "
                            "instead of --train-data; several as a weighted blend: 0.7 PREFIX_A 0.3 PREFIX_B. "
                            "--split divides each one's documents")
    group.add_argument("--data-cache-path", default=None,
                       help="where the sample indices of --data-path are cached (default beside each dataset, or "
                            "under --cache-dir when that folder is read-only)")
    group.add_argument("--use-npy-data-loader", action="store_true",
                       help="GPT2: read 2019-style .npy token shards (openwebtext/make_gpt2_dataset.py) from "
                            "--train-data-path/--val-data-path/--test-data-path")
    group.add_argument("--train-data-path", default=None, help="--use-npy-data-loader: folder of training shards")
    group.add_argument("--val-data-path", default=None, help="--use-npy-data-loader: folder of validation shards")
    group.add_argument("--test-data-path", default=None, help="--use-npy-data-loader: folder of test shards")
    group.add_argument("--input-data-sizes-file", default="sizes.txt",
                       help="--use-npy-data-loader: json file in each folder mapping shard name -> token count")
    group.add_argument("--trust-pickle", action="store_true",
                       help="--use-npy-data-loader: allow 2019 shards saved as pickled object arrays (pickle can "
                            "run code: only for files you trust)")
    group.add_argument("--lazy-loader", action="store_true",
                       help="tokenize once into a memory-mapped cache under --cache-dir")
    group.add_argument("--cache-dir", default="cache", help="token caches and vocabulary files")
    group.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                       choices=["GPT2BPETokenizer", "BertWordPieceTokenizer", "SentencePieceTokenizer",
                                "CharacterLevelTokenizer"],
                       help="tokenizer")
    group.add_argument("--tokenizer-model-type", default=None,
                       help="BertWordPieceTokenizer: bert-large-uncased, bert-base-cased, ... (casing follows the "
                            "name) or a Hugging Face BERT folder; SentencePieceTokenizer: bpe, unigram, char, word")
    group.add_argument("--tokenizer-path", default="tokenizer.model",
                       help="SentencePieceTokenizer: the model file; trained from --train-data when it is absent")
    group.add_argument("--vocab-file", default=None, help="vocabulary file (GPT2 vocab.json or BERT vocab.txt)")
    group.add_argument("--merge-file", default=None, help="GPT2 BPE merges.txt")
    group.add_argument("--seq-length", type=int, default=512,
                       help="tokens per training sample (generation and evaluation: default the model's "
                            "position count)")
    group.add_argument("--max-preds-per-seq", type=int, default=None,
                       help="BERT: at most this many masked tokens per sample (required with --use-tfrecords)")
    group.add_argument("--eval-max-preds-per-seq", type=int, default=None,
                       help="BERT: --max-preds-per-seq of the validation and test samples (default: the training one)")
    group.add_argument("--use-tfrecords", action="store_true",
                       help="BERT: --train-data (and --valid-data/--test-data) are TFRecord files written by "
                            "Google BERT's create_pretraining_data.py")
    group.add_argument("--presplit-sentences", action="store_true", help="BERT: documents are one sentence a line")
    group.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    group.add_argument("--reset-position-ids", action="store_true",
                       help="GPT2: restart position ids after each end-of-document token")
    group.add_argument("--reset-attention-mask", action="store_true",
                       help="GPT2: do not attend across end-of-document tokens")
    group.add_argument("--eod-mask-loss", action="store_true", help="GPT2: no loss on end-of-document tokens")


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation", "evaluate_gpt2.py: wikitext, LAMBADA, loose-json perplexity")
    group.add_argument("--eval-batch-size", type=int, default=None,
                       help="samples per rank in each validation, test or evaluation batch (default "
                            "--micro-batch-size)")
    group.add_argument("--eval-seq-length", type=int, default=None,
                       help="tokens per validation and test sample, and evaluate_gpt2.py's window (default "
                            "--seq-length)")
    group.add_argument("--overlapping-eval", type=int, default=32,
                       help="wikitext: stride between windows; later windows score only their last this-many targets")
    group.add_argument("--cloze-eval", action="store_true", help="LAMBADA cloze accuracy on --valid-data")
    group.add_argument("--strict-lambada", action="store_true",
                       help="LAMBADA: a passage counts only if every token of its last word is predicted")
    group.add_argument("--webtext-eval", action="store_true",
                       help="perplexity over --eval-iters batches of a loose-json file")
    group.add_argument("--results-file", default=None, help="write the evaluation results here as one JSON object")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation", "generate_samples.py: sampling")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token")
    group.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this before sampling")
    group.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    group.add_argument("--top_p", type=float, default=0.0,
                       help="sample among the fewest tokens whose probability reaches p (0: off)")
    group.add_argument("--out-seq-length", type=int, default=256, help="most tokens to generate per sample")
    group.add_argument("--sample-input-file", default=None, help="one prompt per line; generate for each")
    group.add_argument("--sample-output-file", default=None,
                       help="write one JSON object per sample (prompt, text, token_ids) here")
    group.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    group.add_argument("--num-samples", type=int, default=0,
                       help="unconditional samples to generate (without --sample-input-file)")


def build_parser(description: str = "Megatron-LM training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, usage="%(prog)s [options] (see the groups below)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (add_model_args, add_precision_args, add_training_args, add_checkpoint_args,
                add_distributed_args, add_data_args, add_evaluation_args, add_generation_args):
        add(parser)
    return parser


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


# TransformerConfig field -> the flag's destination, for the shape flags a user may give or omit.
SHAPE_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "max_sequence_length": "max_position_embeddings",
    "intermediate_size": "intermediate_size",
}
# The shape of a new model when a flag is not given (intermediate size: 4 x hidden, in the model).
MODEL_SHAPE_DEFAULTS = {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                        "max_position_embeddings": 512}


def flag_name(dest: str) -> str:
    """``--num-layers`` for ``num_layers``."""
    return "--" + dest.replace("_", "-")


def check_model_shape(shape: dict[str, int | None], model_parallel_size: int, seq_length: int | None,
                      where: str = "", eval_seq_length: int | None = None) -> None:
    """The one check of a model's shape (keyed by flag destination; ``None`` means not known yet)
    against the model-parallel size and the sequence lengths (training and validation); ``where``
    names the checkpoint the values came from."""
    heads, hidden = shape.get("num_attention_heads"), shape.get("hidden_size")
    positions = shape.get("max_position_embeddings")
    suffix = f" (the checkpoint's in {where})" if where else ""
    _check(heads is None or heads % model_parallel_size == 0,
           f"--num-attention-heads {heads} is not divisible by --model-parallel-size {model_parallel_size}{suffix}")
    _check(heads is None or hidden is None or hidden % heads == 0,
           f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads}{suffix}")
    _check(seq_length is None or positions is None or seq_length <= positions,
           f"--seq-length {seq_length} exceeds --max-position-embeddings {positions}{suffix}")
    _check(eval_seq_length is None or positions is None or eval_seq_length <= positions,
           f"--eval-seq-length {eval_seq_length} exceeds --max-position-embeddings {positions}{suffix}")


def _check_numbers(args: argparse.Namespace) -> None:
    """Optimizer and model numbers that cannot train are argument errors, not an optimizer traceback."""
    for dest, low, high, low_in, high_in, what in FLOAT_RANGES:
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        _check(math.isfinite(value), f"{flag} must be a finite number ({what}), got {value}")
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            interval = f"{'[' if low_in else '('}{low:g}, {'inf' if high == math.inf else f'{high:g}'}" \
                       f"{']' if high_in else ')'}"
            _check(False, f"{flag} must lie in {interval} ({what}), got {value}")
    _check(args.lr > 0 or args.train_iters == 0,
           f"--lr 0 trains nothing in {args.train_iters} iterations; give a positive --lr")
    _check(args.min_lr <= args.lr, f"--min-lr {args.min_lr} is above --lr {args.lr}")


def validate_args(args: argparse.Namespace) -> None:
    """Reject inconsistent settings with one actionable line."""
    for flag in (*SHAPE_FLAGS.values(), "seq_length"):
        value = getattr(args, flag)
        _check(value is None or value >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    _check(args.vocab_size is None or args.tokenizer_type == "SentencePieceTokenizer",
           "--vocab-size only applies to --tokenizer-type SentencePieceTokenizer (the size of a model it trains); "
           "other tokenizers take it from their vocabulary")
    _check(args.vocab_size is None or args.vocab_size >= 8, f"--vocab-size must be at least 8, got {args.vocab_size}")
    _check(args.max_preds_per_seq is None or args.max_preds_per_seq >= 1,
           f"--max-preds-per-seq must be at least 1, got {args.max_preds_per_seq}")
    _check(not args.use_tfrecords or args.max_preds_per_seq is not None,
           "--use-tfrecords needs --max-preds-per-seq (the max_predictions_per_seq the records were written with)")
    _check(args.num_workers >= 0, f"--num-workers must not be negative, got {args.num_workers}")
    if args.delim is not None:
        args.delim = {"\\t": "\t", "tab": "\t"}.get(args.delim, args.delim)
        _check(len(args.delim) == 1, f"--delim {args.delim!r}: expected one character, e.g. ',' or '\\t'")
    sources = [flag for flag, given in (("--train-data", args.train_data), ("--data-path", args.data_path),
                                        ("--use-npy-data-loader", args.use_npy_data_loader)) if given]
    _check(len(sources) <= 1, f"{' and '.join(sources)} are exclusive: train from one kind of data")
    _check(not args.use_npy_data_loader or args.train_data_path or args.train_iters == 0,
           "--use-npy-data-loader needs --train-data-path (a folder of .npy shards and their sizes file)")
    _check(not (args.use_tfrecords and (args.data_path or args.use_npy_data_loader)),
           "--use-tfrecords reads --train-data; it does not combine with --data-path or --use-npy-data-loader")
    _check(args.loss_scale is None or args.fp16, "--loss-scale only applies with --fp16")
    _check_numbers(args)
    mp = args.model_parallel_size
    check_parallel_sizes(args.world_size, mp, args.pipeline_model_parallel_size,
                         args.num_layers_per_virtual_pipeline_stage, args.DDP_impl, args.num_layers,
                         args.micro_batch_size, args.global_batch_size, bool(args.rampup_batch_size))
    # Without --load the defaults complete the shape; with it, what is given is checked now and the
    # whole shape once the checkpoint's config is known.
    shape = {dest: getattr(args, dest) for dest in SHAPE_FLAGS.values()}
    if not args.load:
        shape = {dest: MODEL_SHAPE_DEFAULTS.get(dest) if value is None else value for dest, value in shape.items()}
    check_model_shape(shape, mp, args.seq_length, eval_seq_length=args.eval_seq_length)
    _check(not (args.fp16 and args.bf16), "--fp16 and --bf16 are exclusive; pick one")
    _check(not (args.use_distributed_optimizer and args.DDP_impl == "torch"),
           "--use-distributed-optimizer does its own gradient reduce-scatter; it works with --DDP-impl local only")
    _check(not args.overlap_grad_reduce or (args.DDP_impl == "local" and not args.use_distributed_optimizer),
           "--overlap-grad-reduce overlaps the local DDP's all-reduce (torch DDP always overlaps); it does not "
           "combine with --use-distributed-optimizer, whose reduce-scatter runs in the optimizer step")
    _check(not args.sequence_parallel or mp > 1, "--sequence-parallel needs --model-parallel-size 2 or more")
    for flag, length in (("--seq-length", args.seq_length), ("--eval-seq-length", args.eval_seq_length)):
        _check(not args.sequence_parallel or length is None or length % mp == 0,
               f"--sequence-parallel splits the sequence over --model-parallel-size {mp}; {flag} {length} is "
               f"not a multiple of it")
    islands = [f for f, on in (("--fp32-embedding", args.fp32_embedding), ("--fp32-layernorm", args.fp32_layernorm),
                               ("--fp32-tokentypes", args.fp32_tokentypes)) if on]
    _check(not islands or args.fp16 or args.bf16, f"{islands[0] if islands else ''} only makes sense with --fp16 "
                                                  "or --bf16")
    _check(0.0 <= args.warmup <= 1.0, f"--warmup is a fraction of --lr-decay-iters, got {args.warmup}")
    _check(args.checkpoint_num_layers >= 1, "--checkpoint-num-layers must be at least 1")
    _check(args.micro_batch_size >= 1, f"--micro-batch-size must be at least 1, got {args.micro_batch_size}")
    _check(args.eval_batch_size is None or args.eval_batch_size >= 1,
           f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    _check(args.eval_seq_length is None or args.eval_seq_length >= 1,
           f"--eval-seq-length must be at least 1, got {args.eval_seq_length}")
    _check(args.eval_max_preds_per_seq is None or args.eval_max_preds_per_seq >= 1,
           f"--eval-max-preds-per-seq must be at least 1, got {args.eval_max_preds_per_seq}")
    batch_schedule(args)  # the global batch splits into micro-batches (ArgumentError otherwise)
    _check(args.log_interval >= 1, f"--log-interval must be at least 1, got {args.log_interval}")
    _check(args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
           f"--exit-duration-in-mins must be positive, got {args.exit_duration_in_mins}")
    _check(math.isfinite(args.distributed_timeout_minutes) and args.distributed_timeout_minutes > 0,
           f"--distributed-timeout-minutes must be a positive number, got {args.distributed_timeout_minutes}")
    _check(0.0 < args.max_skipped_fraction <= 1.0,
           f"--max-skipped-fraction must lie in (0, 1], got {args.max_skipped_fraction}")
    _check(args.peak_tflops is None or (math.isfinite(args.peak_tflops) and args.peak_tflops > 0),
           f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    _check(args.greedy or args.temperature > 0,
           f"--temperature must be above 0, got {args.temperature}; use --greedy for argmax")
    _check(args.top_k >= 0, f"--top_k must not be negative, got {args.top_k} (0 keeps every token)")
    _check(0.0 <= args.top_p <= 1.0, f"--top_p is a probability in [0, 1], got {args.top_p} (0 keeps every token)")
    _check(args.skipped_window >= 1, f"--skipped-window must be at least 1, got {args.skipped_window}")
    _check(args.keep_last_checkpoints is None or args.keep_last_checkpoints >= 1,
           f"--keep-last-checkpoints must be at least 1, got {args.keep_last_checkpoints}")
    _check(0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32) (numpy's seed range), got {args.seed}")
    for flag in ("save_interval", "eval_interval", "exit_interval", "eval_iters", "train_iters", "lr_decay_iters"):
        value = getattr(args, flag)
        _check(value is None or value >= 0, f"--{flag.replace('_', '-')} must not be negative, got {value}")
    if args.device == "cuda":
        _check(torch.cuda.is_available(), "--device cuda but torch sees no CUDA device; use --device cpu")
    if args.distributed_backend == "nccl":
        _check(args.device == "cuda", "--distributed-backend nccl needs CUDA; use gloo on cpu")


# Launchers other than torchrun: (rank, world size, local rank) variables, as the 2019 code read OpenMPI's.
LAUNCHER_VARIABLES = {
    "OpenMPI (mpirun)": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "SLURM (srun)": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}


def adopt_launcher_environment(environ: dict[str, str] | None = None) -> str | None:
    """Without torchrun's ``RANK``/``WORLD_SIZE``, take them from OpenMPI's or SLURM's variables.

    Sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in ``environ`` (default ``os.environ``) for the
    ``env://`` initialisation and returns the launcher's name (``None`` when torchrun's are there or
    no launcher is). A multi-process launch also needs ``MASTER_ADDR`` and ``MASTER_PORT``.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return None
    for name, (rank, size, local) in LAUNCHER_VARIABLES.items():
        if rank in env and size in env:
            values = {"RANK": env[rank], "WORLD_SIZE": env[size], "LOCAL_RANK": env.get(local, "0")}
            for key, value in values.items():
                _check(value.isdigit(), f"{name}: {key} from the launcher is {value!r}, not a number")
            if int(values["WORLD_SIZE"]) > 1:
                missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
                _check(not missing, f"launched by {name} with {values['WORLD_SIZE']} processes but "
                                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; export "
                                    "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port)")
            env.update(values)
            return name
    return None


def derive_args(args: argparse.Namespace) -> None:
    """Fill in the values derived from flags and the launcher's environment (called once)."""
    adopt_launcher_environment()
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        args.local_rank = int(local_rank)
    elif args.local_rank is None:
        args.local_rank = 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    model_ranks = max(1, args.model_parallel_size) * max(1, args.pipeline_model_parallel_size)
    args.data_parallel_size = max(1, args.world_size // model_ranks)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def get_args(
    argv: list[str] | None = None,
    extra_args_provider=None,
    description: str = "Megatron-LM training",
    defaults: dict | None = None,
    model: str | None = None,
) -> argparse.Namespace:
    """Parse, derive and validate; on a mistake print one line and exit with status 2.

    ``defaults`` overrides flag defaults for one entry script (BERT's tokenizer, say); ``model`` (``gpt2``,
    ``bert``) refuses the other model's flags (``flag_rules.MODEL_FLAGS``).
    """
    parser = build_parser(description)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv, namespace=Arguments())
    try:
        derive_args(args)
        validate_args(args)
        misplaced = misplaced_flag(lambda dest: getattr(args, dest) != parser.get_default(dest), model)
        _check(misplaced is None, str(misplaced))
    except ArgumentError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    set_delimiter(args.delim)  # csv/tsv corpora of this process are read with it
    return args.seal()


def batch_schedule(args: argparse.Namespace) -> BatchSchedule:
    """The global batch of every iteration: ``--micro-batch-size``, ``--global-batch-size``,
    ``--rampup-batch-size`` and the data-parallel size."""
    return BatchSchedule(args.micro_batch_size, args.data_parallel_size, args.global_batch_size,
                         tuple(args.rampup_batch_size) if args.rampup_batch_size else None)


def distributed_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``initialize.initialize_distributed`` for this run."""
    return dict(device=args.device, backend=args.distributed_backend, model_parallel_size=args.model_parallel_size,
                local_rank=args.local_rank, timeout_minutes=args.distributed_timeout_minutes,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size)
