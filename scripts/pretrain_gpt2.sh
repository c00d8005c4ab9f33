#!/usr/bin/env bash
# Single-process GPT2 (345M) pretraining, mainly for debugging. Set the corpus with TRAIN_DATA (an
# alias configured through MEGATRON_CORPORA / MEGATRON_CORPUS_<ALIAS>, or a loose-json path).
# Extra flags are appended, e.g. `--device cpu` or `--num-layers 4` (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpt2_345m_args.sh

python pretrain_gpt2.py "${GPT2_345M_ARGS[@]}" \
       --save checkpoints/gpt2_345m \
       --load checkpoints/gpt2_345m \
       "$@"
