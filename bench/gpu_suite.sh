#!/usr/bin/env bash
# The whole GPU check for a session that is lent an accelerator, in one command (about 6 minutes on one
# H100/H200; nothing is downloaded there):
#   1. environment: torch, CUDA device, the packages the project needs (installed from .whl/ if missing);
#   2. the @pytest.mark.gpu tests;
#   3. GPT2-345M (24 layers, hidden 1024, 16 heads, seq 1024) through the real loop, pretrain_gpt2.py with
#      --log-timers: bf16, and fp16 with fp32 masters and dynamic loss scaling, each with and without
#      --checkpoint-activations, and bf16 with --compile; tokens/s, TFLOP/s per device, MFU against the
#      device's dense peak and peak memory read back from metrics.jsonl;
#   4. the same training step in Hugging Face transformers at the same shape (bench/gpt2_train_step.py),
#      bf16 autocast, for the ratio.
# A summary table is printed at the end and written to $OUT/gpu_suite_summary.txt ($OUT defaults to
# bench_results/); every log is kept beside it.
#
#   bash bench/gpu_suite.sh                # on the GPU machine
#   bash bench/gpu_suite.sh --cpu-smoke    # the same plumbing on CPU with a tiny model, about a minute
#
# Data: the GPT-2 vocabulary and the Shakespeare corpus from `python tools/fetch_sample_data.py --cache-dir
# cache` when cache/ holds them (carry cache/ to the GPU machine), else a generated corpus with the
# character-level tokenizer (throughput does not depend on the text).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/gpu_suite_summary.txt"
: > "$SUMMARY"
say() { echo "$@" | tee -a "$SUMMARY"; }
START=$(date +%s)

# 1. environment -------------------------------------------------------------------------------------
missing=$($PY - <<'EOF'
import importlib.util
need = ["torch", "numpy", "tokenizers", "tqdm", "safetensors", "transformers", "pytest", "regex"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing from .whl/: $missing"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  else
    say "missing packages: $missing (put their wheels in .whl/); continuing without what needs them"
  fi
fi
$PY - <<'EOF' | tee -a "$SUMMARY"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu only'}")
EOF
if [[ $SMOKE == 0 ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: run with --cpu-smoke to check the plumbing on CPU"; exit 1
fi

# 2. GPU tests ----------------------------------------------------------------------------------------
if [[ $SMOKE == 0 ]]; then
  timeout 300 $PY -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
  say "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
else
  $PY -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -1 | sed 's/^/gpu tests (cpu smoke: all skip): /' \
    | tee -a "$SUMMARY"
fi

# 3. the real loop at GPT2-345M -----------------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then
  SHAPE=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64
         --batch-size 4 --device cpu)
  ITERS=6; LOG=2
else
  SHAPE=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024
         --max-position-embeddings 1024 --batch-size 8 --device cuda)
  ITERS=40; LOG=10
fi
if [[ -f cache/gpt2-vocab.json && -f cache/gpt2-merges.txt && -f cache/shakespeare.json ]]; then
  DATA=(--tokenizer-type GPT2BPETokenizer --cache-dir cache --train-data cache/shakespeare.json)
else
  mkdir -p "$OUT/data"
  $PY - "$OUT/data/corpus.json" <<'EOF'
import json, random, sys
rng = random.Random(0)
words = [w for w in "the of and to in a is that for it as was with be by on not he this are or his".split()]
with open(sys.argv[1], "w") as f:
    for _ in range(3000):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
EOF
  DATA=(--tokenizer-type CharacterLevelTokenizer --cache-dir "$OUT/data" --train-data "$OUT/data/corpus.json")
fi

run_loop() {  # name, extra flags...
  local name=$1; shift
  local dir="$OUT/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  if timeout 420 $PY pretrain_gpt2.py "${SHAPE[@]}" "${DATA[@]}" --split 1 --train-iters $ITERS \
      --log-interval $LOG --eval-iters 0 --lr 1e-4 --warmup 0.1 --hidden-dropout 0 --attention-dropout 0 \
      --lazy-loader --num-workers 1 --log-timers --log-dir "$dir" "$@" > "$dir/log.txt" 2>&1; then
    $PY - "$name" "$dir/metrics.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
name, path = sys.argv[1], sys.argv[2]
lines = [json.loads(line) for line in open(path) if line.strip()]
train = [r for r in lines if r.get("split") == "train"]
last = train[-1]  # the last interval: warm, compiled, scale settled
mem = last.get("peak_allocated_mb") or last.get("peak_rss_mb") or 0.0
mfu = last.get("mfu")
phases = " ".join(f"{k[5:-3]} {v:.0f}" for k, v in last.items() if k.startswith("time_") and k.endswith("_ms"))
print(f"{name:<28} tokens/s {last['tokens_per_s']:>9.0f} | TFLOP/s/device {last.get('tflops_per_device', 0):7.1f} | "
      f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6} | peak mem {mem / 1024:6.2f} GiB | "
      f"loss {last['lm_loss']:.3f} | ms: {phases}")
EOF
  else
    say "$name: FAILED (see $dir/log.txt): $(grep -m1 -i 'error' "$dir/log.txt" || tail -1 "$dir/log.txt")"
  fi
}

say "--- pretrain_gpt2.py, $( [[ $SMOKE == 1 ]] && echo 'tiny model on CPU' || echo 'GPT2-345M, batch 8 x 1024' ) ---"
run_loop bf16 --bf16
run_loop bf16_checkpointed --bf16 --checkpoint-activations
run_loop fp16 --fp16
run_loop fp16_checkpointed --fp16 --checkpoint-activations
run_loop bf16_compiled --bf16 --compile

# 4. transformers at the same shape ---------------------------------------------------------------------
if $PY -c "import transformers" 2>/dev/null; then
  if [[ $SMOKE == 1 ]]; then
    STEP=(--num-layers 2 --hidden-size 64 --heads 4 --seq-length 64 --batch-size 4 --steps 3 --device cpu --dtype bf16)
  else
    STEP=(--num-layers 24 --hidden-size 1024 --heads 16 --seq-length 1024 --batch-size 8 --steps 10 --device cuda
          --dtype bf16)
  fi
  say "--- one training step vs transformers (bench/gpt2_train_step.py ${STEP[*]}) ---"
  timeout 300 $PY bench/gpt2_train_step.py "${STEP[@]}" 2>&1 | tee "$OUT/train_step_vs_transformers.log" \
    | grep -E "median|ratio|device" | tee -a "$SUMMARY"
fi
say "gpu suite done in $(( $(date +%s) - START )) s; logs in $OUT/"
