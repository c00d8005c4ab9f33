#!/usr/bin/env bash
# Single-process BERT (345M) pretraining with a SentencePiece tokenizer. When TOKENIZER_PATH (default
# tokenizer.model) does not exist, a model is trained on the training corpus first (VOCAB_SIZE pieces,
# TOKENIZER_MODEL_TYPE bpe|unigram|char|word) and written next to it as .model and .vocab; later runs,
# and the other launchers given `--tokenizer-type SentencePieceTokenizer --tokenizer-path ...`, reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bert_345m_args.sh

python pretrain_bert.py "${BERT_345M_ARGS[@]}" "${BERT_JSON_DATA_ARGS[@]}" \
       --tokenizer-type SentencePieceTokenizer \
       --tokenizer-model-type "${TOKENIZER_MODEL_TYPE:-bpe}" \
       --tokenizer-path "${TOKENIZER_PATH:-tokenizer.model}" \
       --vocab-size "${VOCAB_SIZE:-30522}" \
       --save checkpoints/bert_345m_sentencepiece \
       --load checkpoints/bert_345m_sentencepiece \
       "$@"
