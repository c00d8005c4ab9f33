#!/usr/bin/env bash
# Interactive GPT2 text generation from a trained checkpoint (see "Generating text" in README.md).
# Every setting below can be overridden from the environment, e.g.
#   GREEDY=1 bash scripts/generate_text.sh
#   CHECKPOINT_PATH=checkpoints/gpt2_345m_mp2 MP_SIZE=2 bash scripts/generate_text.sh --fp16
# The model's shape comes from the checkpoint. Extra flags are appended, e.g.
# `--sample-input-file prompts.txt --sample-output-file samples.jsonl` or `--num-samples 10`.
# The 2019 script differed in three defaults: --out-seq-length 1024 (2019 generated prompt length + that
# many tokens; here it counts new tokens), --top_p 0 (the whole distribution at temperature 0.9) and --fp16
# (a GPU); these suit the CPU sample checkpoint. For 2019's: OUT_SEQ_LENGTH=1024 TOP_P=0 ... --fp16
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt2_cpu_sample}  # what pretrain_gpt2_cpu_sample.sh writes
MP_SIZE=${MP_SIZE:-1}               # model-parallel size the checkpoint was trained with
TEMPERATURE=${TEMPERATURE:-0.9}     # logits are divided by this before sampling
TOP_K=${TOP_K:-0}                   # sample among the k most likely tokens (0: all)
TOP_P=${TOP_P:-0.9}                 # then among the fewest tokens whose probability reaches p (0: all)
GREEDY=${GREEDY:-0}                 # 1: always take the most likely token (ignores the three above)
OUT_SEQ_LENGTH=${OUT_SEQ_LENGTH:-256}  # most new tokens per prompt
SEED=${SEED:-1234}                  # the same seed gives the same samples

GENERATION_ARGS=(
       --load "$CHECKPOINT_PATH"
       --model-parallel-size "$MP_SIZE"
       --tokenizer-type GPT2BPETokenizer
       --cache-dir cache
       --temperature "$TEMPERATURE"
       --top_k "$TOP_K"
       --top_p "$TOP_P"
       --out-seq-length "$OUT_SEQ_LENGTH"
       --seed "$SEED"
)
if [ "$GREEDY" = 1 ]; then
       GENERATION_ARGS+=(--greedy)
fi

if [ "$MP_SIZE" -gt 1 ]; then
       torchrun --nproc_per_node "$MP_SIZE" --nnodes 1 generate_samples.py "${GENERATION_ARGS[@]}" "$@"
else
       python generate_samples.py "${GENERATION_ARGS[@]}" "$@"
fi
