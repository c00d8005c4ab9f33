#!/usr/bin/env bash
# Data-parallel BERT (345M) pretraining from TFRecords written by Google BERT's
# create_pretraining_data.py (--max_seq_length 512 --max_predictions_per_seq 80). Each data-parallel
# rank reads whole files: give at least as many TRAIN_TFRECORDS files as ranks.
#   TRAIN_TFRECORDS="data/part-0.tfrecord data/part-1.tfrecord" VALID_TFRECORDS=data/valid.tfrecord \
#   bash scripts/pretrain_bert_tfrecords_distributed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bert_345m_args.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
read -r -a TRAIN <<< "${TRAIN_TFRECORDS:?set TRAIN_TFRECORDS to the whitespace-separated TFRecord files}"
EVAL_ARGS=()
if [[ -n "${VALID_TFRECORDS:-}" ]]; then read -r -a VALID <<< "$VALID_TFRECORDS"; EVAL_ARGS+=(--valid-data "${VALID[@]}"); fi
if [[ -n "${TEST_TFRECORDS:-}" ]]; then read -r -a TEST <<< "$TEST_TFRECORDS"; EVAL_ARGS+=(--test-data "${TEST[@]}"); fi

torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
       pretrain_bert.py "${BERT_345M_ARGS[@]}" "${BERT_WORDPIECE_ARGS[@]}" \
       --use-tfrecords \
       --train-data "${TRAIN[@]}" \
       "${EVAL_ARGS[@]}" \
       --hysteresis 2 \
       --num-workers 2 \
       --save checkpoints/bert_345m_tfrecords \
       --load checkpoints/bert_345m_tfrecords \
       "$@"
