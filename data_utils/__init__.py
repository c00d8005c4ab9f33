"""The data path: tokenizers, corpus aliases, lazily cached corpora, splits, datasets and loaders.

Public surface::

    tokenizer = make_tokenizer("GPT2BPETokenizer", cache_dir="cache")
    train, valid, test = build_gpt2_datasets(["shakespeare"], None, None, "949,50,1", 1024, tokenizer,
                                             lazy=True, cache_dir="cache", seed=1234)
    batches = make_data_loader(train, batch_size=8, dp_rank=0, dp_size=1, seed=1234)
    next(batches)["text"]  # LongTensor [8, 1025]; batches.state_dict() -> {"consumed_samples": 8}

    bert_tokenizer = make_tokenizer("BertWordPieceTokenizer", cache_dir="cache")
    train, valid, test = build_bert_datasets(["wikipedia"], None, None, "949,50,1", 512, 80, bert_tokenizer,
                                             lazy=True, cache_dir="cache", seed=1234, presplit_sentences=True)
    train[0]  # {'text', 'types', 'is_random', 'mask', 'mask_labels', 'pad_mask'}: int64 arrays

Every user mistake raises ``DataError`` (a ``ValueError``) with a one-line message.
"""

from data_utils.bert_dataset import BertSentencePairDataset, SentenceDocuments, build_bert_datasets
from data_utils.corpora import NAMED_CORPORA, read_loose_json, resolve_corpora, resolve_corpus
from data_utils.datasets import GPT2Dataset, build_gpt2_datasets, parse_split
from data_utils.errors import DataError
from data_utils.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from data_utils.lazy_loader import SentenceCorpus, load_sentence_corpus
from data_utils.npy_dataset import NpyShardsDataset, build_npy_datasets
from data_utils.samplers import DataIterator, DistributedBatchSampler, SequentialBatchSampler, make_data_loader
from data_utils.sentences import split_sentences
from data_utils.tf_dl import TFRecordBertDataset, build_tfrecord_datasets, shard_tfrecord_files
from data_utils.tokenization import Tokenizer, make_tokenizer

__all__ = [
    "BertSentencePairDataset", "DataError", "DataIterator", "DistributedBatchSampler", "GPT2Dataset",
    "IndexedDataset", "IndexedDatasetBuilder", "NAMED_CORPORA", "NpyShardsDataset", "SentenceCorpus",
    "SentenceDocuments", "SequentialBatchSampler", "TFRecordBertDataset", "Tokenizer", "best_dtype",
    "build_bert_datasets", "build_gpt2_datasets", "build_npy_datasets", "build_tfrecord_datasets",
    "load_sentence_corpus", "make_data_loader", "make_tokenizer", "parse_split", "read_loose_json", "resolve_corpora",
    "resolve_corpus", "shard_tfrecord_files", "split_sentences"
]
