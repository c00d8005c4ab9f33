#!/usr/bin/env bash
# Data-parallel BERT (345M) pretraining with torchrun. For several nodes set NNODES, NODE_RANK,
# MASTER_ADDR and MASTER_PORT on each node (the env:// rendezvous). NCCL on GPUs, gloo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bert_345m_args.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
       pretrain_bert.py "${BERT_345M_ARGS[@]}" "${BERT_JSON_DATA_ARGS[@]}" "${BERT_WORDPIECE_ARGS[@]}" \
       --save checkpoints/bert_345m \
       --load checkpoints/bert_345m \
       "$@"
