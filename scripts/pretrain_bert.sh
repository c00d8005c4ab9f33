#!/usr/bin/env bash
# Single-process BERT (345M) pretraining, mainly for debugging. Set the corpus with TRAIN_DATA (an
# alias configured through MEGATRON_CORPORA / MEGATRON_CORPUS_<ALIAS>, or a loose-json path).
# Extra flags are appended, e.g. `--device cpu` or `--num-layers 4` (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bert_345m_args.sh

python pretrain_bert.py "${BERT_345M_ARGS[@]}" "${BERT_JSON_DATA_ARGS[@]}" "${BERT_WORDPIECE_ARGS[@]}" \
       --save checkpoints/bert_345m \
       --load checkpoints/bert_345m \
       "$@"
