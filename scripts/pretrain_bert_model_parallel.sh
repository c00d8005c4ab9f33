#!/usr/bin/env bash
# Model- and data-parallel BERT (345M) pretraining with torchrun: WORLD_SIZE processes split into
# MP_SIZE-way model parallelism and WORLD_SIZE / MP_SIZE-way data parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bert_345m_args.sh

WORLD_SIZE=${WORLD_SIZE:-8}
MP_SIZE=${MP_SIZE:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

torchrun --nproc_per_node "$((WORLD_SIZE / NNODES))" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
       pretrain_bert.py "${BERT_345M_ARGS[@]}" "${BERT_JSON_DATA_ARGS[@]}" "${BERT_WORDPIECE_ARGS[@]}" \
       --model-parallel-size "$MP_SIZE" \
       --save checkpoints/bert_345m_mp"$MP_SIZE" \
       --load checkpoints/bert_345m_mp"$MP_SIZE" \
       "$@"
