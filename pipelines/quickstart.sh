#!/usr/bin/env bash
# capcurate quickstart: the whole curation pipeline on CapWorld, offline, on a laptop CPU.
#
#   synth -> serve the images on 127.0.0.1 -> download -> train a tiny CoCa captioner on the clean seed
#   split -> recaption the pool -> train a tiny CLIP scorer on the seed split -> score -> filter/mix
#   under five strategies -> shard -> train one tiny CLIP per strategy on the same number of samples
#   -> eval each -> results.md, results.json, results.png
#
# Every step is a plain `capcurate` command, echoed before it runs ("+ capcurate ..."): copy any of
# them to run it yourself. `make demo` calls this script with .venv/bin on PATH.
#
# Knobs (environment variables):
#   QUICKSTART_OUT=demo_out      where everything goes (a folder this script made earlier is replaced)
#   QUICKSTART_SCALE=demo|tiny   demo: ~10 minutes on 2 CPU cores; tiny: a smoke test of every step
#   QUICKSTART_SEED=0            seed of the world, of every training run and of the shard shuffle
#   QUICKSTART_STRATEGIES="raw raw_top synthetic raw_top_synthetic best_of"   the selections to train and
#                                evaluate (all five are always made: that is cheap)
#   QUICKSTART_POOL, QUICKSTART_SEED_SPLIT, QUICKSTART_EVAL, QUICKSTART_IMAGE_SIZE,
#   QUICKSTART_CAPTIONER_SAMPLES, QUICKSTART_SCORER_SAMPLES, QUICKSTART_TRAIN_SAMPLES,
#   QUICKSTART_BATCH_SIZE, QUICKSTART_TOP_FRACTION, QUICKSTART_NOISE_PROFILE   override the scale's values
set -euo pipefail

SCALE=${QUICKSTART_SCALE:-demo}
case "$SCALE" in
  demo) pool=3000 seed_split=2000 n_eval=640 img=64 cap_samples=10000 scorer_samples=4000 train_samples=4000 bs=32 ;;
  tiny) pool=96 seed_split=64 n_eval=64 img=32 cap_samples=64 scorer_samples=64 train_samples=64 bs=32 ;;
  *) echo "error: QUICKSTART_SCALE must be demo or tiny, got '$SCALE'" >&2; exit 2 ;;
esac
OUT=${QUICKSTART_OUT:-demo_out}
SEED=${QUICKSTART_SEED:-0}
POOL=${QUICKSTART_POOL:-$pool}
SEED_SPLIT=${QUICKSTART_SEED_SPLIT:-$seed_split}
N_EVAL=${QUICKSTART_EVAL:-$n_eval}
IMG=${QUICKSTART_IMAGE_SIZE:-$img}
CAP_SAMPLES=${QUICKSTART_CAPTIONER_SAMPLES:-$cap_samples}
SCORER_SAMPLES=${QUICKSTART_SCORER_SAMPLES:-$scorer_samples}
TRAIN_SAMPLES=${QUICKSTART_TRAIN_SAMPLES:-$train_samples}
BS=${QUICKSTART_BATCH_SIZE:-$bs}
TOP=${QUICKSTART_TOP_FRACTION:-0.3}
NOISE=${QUICKSTART_NOISE_PROFILE:-web}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

command -v capcurate >/dev/null || { echo "error: capcurate is not on PATH (run 'make demo', or put .venv/bin on PATH)" >&2; exit 2; }
MARKER="$OUT/.capcurate-quickstart"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  [ -e "$MARKER" ] || { echo "error: $OUT exists and was not made by this script; set QUICKSTART_OUT to another folder" >&2; exit 3; }
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
touch "$MARKER"
WORLD="$OUT/world" DS="$OUT/dataset" RUNS="$OUT/runs" SHARDS="$OUT/shards" EVALS="$OUT/evals"
mkdir -p "$EVALS"
export CAPCURATE_PROGRESS=${CAPCURATE_PROGRESS:-0} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

START=$(date +%s)
run() { echo "+ $*" >&2; "$@"; }
step() { echo >&2; echo "== [$(( $(date +%s) - START ))s] $*" >&2; }
# training options shared by every run; `--train-num-samples N --epochs 1` fixes the compute (samples seen)
TRAIN_OPTS=(--batch-size "$BS" --epochs 1 --lr 1e-3 --warmup 10 --wd 0.1 --workers 1 --seed "$SEED")

step "1/9 synth: render CapWorld ($POOL pool, $SEED_SPLIT seed, $N_EVAL eval images at ${IMG}px, noise profile $NOISE)"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run capcurate synth -o "$WORLD" --n-images "$POOL" --seed-size "$SEED_SPLIT" --eval-size "$N_EVAL" \
  --image-size "$IMG" --noise-profile "$NOISE" --seed "$SEED" --base-url "http://127.0.0.1:$PORT"

step "2/9 serve the world's images on http://127.0.0.1:$PORT and download them"
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORLD" >"$OUT/http.log" 2>&1 &
SERVER_PID=$!
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT
"$PY" - "$PORT" <<'PYEOF'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/synth.json", timeout=1).read()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("error: the local HTTP server did not start")
PYEOF
run capcurate download "$WORLD/urls.parquet" -o "$DS" --image-size "$IMG" --resize-mode border \
  --processes 2 --threads 16 --samples-per-shard 1000 --timeout 5
stop_server  # the images are in the dataset now

step "3/9 train a tiny CoCa captioner on the clean seed split ($CAP_SAMPLES samples)"
run capcurate train "$WORLD/seed" -o "$RUNS/captioner" --model-config "$WORLD/models/tiny_coca.json" --loss coca \
  --train-num-samples "$CAP_SAMPLES" "${TRAIN_OPTS[@]}"

step "4/9 recaption the pool with it"
run capcurate recaption "$DS" --model "$RUNS/captioner" --name coca --decoding greedy --max-new-tokens 24 \
  --batch-size 128

step "5/9 train a tiny CLIP scorer on the seed split ($SCORER_SAMPLES samples) and score raw + synthetic captions"
run capcurate train "$WORLD/seed" -o "$RUNS/scorer" --model-config "$WORLD/models/tiny_clip.json" \
  --train-num-samples "$SCORER_SAMPLES" "${TRAIN_OPTS[@]}"
run capcurate score "$DS" --model "$RUNS/scorer" --name clip --captions raw,coca --batch-size 128

step "6/9 filter and mix: five ways to choose the training captions"
run capcurate mix "$DS" --strategy raw --name raw
run capcurate filter "$DS" --name raw_top --score clip:raw --top-fraction "$TOP"
run capcurate mix "$DS" --strategy synthetic --synthetic coca --name synthetic
run capcurate mix "$DS" --strategy raw-top+synthetic --synthetic coca --score clip --top-fraction "$TOP" --name raw_top_synthetic
run capcurate mix "$DS" --strategy best --synthetic coca --score clip --name best_of
read -r -a STRATEGIES <<< "${QUICKSTART_STRATEGIES:-raw raw_top synthetic raw_top_synthetic best_of}"

step "7/9 shard each selection"
for s in "${STRATEGIES[@]}"; do
  run capcurate shard "$DS" --selection "$s" -o "$SHARDS/$s" --samples-per-shard 1000 --min-shards 2 --shuffle --seed "$SEED"
done

step "8/9 train one tiny CLIP per strategy on the same compute ($TRAIN_SAMPLES samples seen each) and evaluate it"
for s in "${STRATEGIES[@]}"; do
  run capcurate train "$SHARDS/$s" -o "$RUNS/$s" --model-config "$WORLD/models/tiny_clip.json" \
    --train-num-samples "$TRAIN_SAMPLES" "${TRAIN_OPTS[@]}"
  run capcurate eval "$RUNS/$s" --data "$WORLD/eval" --output "$EVALS/$s.json"
done

step "9/9 results"
run "$PY" "$HERE/results_table.py" "$OUT" --top-fraction "$TOP"
echo >&2
echo "done in $(( $(date +%s) - START ))s: $OUT/results.md, $OUT/results.json, $OUT/results.png" >&2
