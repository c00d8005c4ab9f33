#!/usr/bin/env bash
# Single-process GPT2 (345M) pretraining, mainly for debugging. The optimisation settings assume
# 64-way data parallelism; see pretrain_gpt2_distributed.sh for the real thing.
# Set the corpus alias in data_utils/corpora.py's configuration (MEGATRON_CORPORA) or pass a path.
set -euo pipefail
cd "$(dirname "$0")/.."

python pretrain_gpt2.py \
       --num-layers 24 \
       --hidden-size 1024 \
       --num-attention-heads 16 \
       --batch-size 8 \
       --seq-length 1024 \
       --max-position-embeddings 1024 \
       --train-iters 320000 \
       --save checkpoints/gpt2_345m \
       --load checkpoints/gpt2_345m \
       --resume-dataloader \
       --train-data "${TRAIN_DATA:-wikipedia}" \
       --lazy-loader \
       --tokenizer-type GPT2BPETokenizer \
       --cache-dir cache \
       --split 949,50,1 \
       --lr 0.00015 \
       --lr-decay-style cosine \
       --weight-decay 1e-2 \
       --clip-grad 1.0 \
       --warmup .01 \
       --checkpoint-activations \
       --fp16 \
       "$@"
