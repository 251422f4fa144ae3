#!/usr/bin/env bash
# capcurate quickstart: the whole curation pipeline on CapWorld, offline, on a laptop CPU.
#
#   synth -> serve the images on 127.0.0.1 -> download -> train a tiny CoCa captioner on the clean seed
#   split -> recaption the pool -> train a tiny CLIP scorer on the seed split -> score -> filter/mix
#   under five strategies -> shard -> train one tiny CLIP per strategy on the same number of samples
#   -> eval each -> results.md, results.json, results.png
#
# Every step is a plain `capcurate` command, echoed before it runs ("+ capcurate ..."): copy any of
# them to run it yourself. `make demo` calls this script with .venv/bin on PATH. Each step's seconds are
# printed at the end (and written to OUT/timings.tsv).
#
# Knobs (environment variables):
#   QUICKSTART_OUT=demo_out      where everything goes (a folder this script made earlier is replaced)
#   QUICKSTART_SCALE=demo|tiny|gpu  demo: under 10 minutes on 2 CPU cores; tiny: a smoke test of every
#                                step; gpu: a bigger world and bigger models for one GPU (same commands,
#                                capcurate's GPU defaults --device auto --precision auto)
#   QUICKSTART_FETCH=download    download: serve the pool on 127.0.0.1 and fetch it with img2dataset (the
#                                real path); ingest: synth also writes the pool as webdataset shards and
#                                `capcurate ingest` adopts them (for machines where img2dataset is missing)
#   QUICKSTART_STORE=s3://b/p    put the dataset, the training shards and the runs in object storage (an
#                                empty prefix; credentials and AWS_ENDPOINT_URL as in docs/storage.md); the
#                                world and the eval JSONs stay in QUICKSTART_OUT
#   QUICKSTART_SEED=0            seed of the world, of every training run and of the shard shuffle
#   QUICKSTART_SEEDS=1           N > 1: the whole pipeline once per seed SEED..SEED+N-1 into OUT/seed_<k>/,
#                                then one table of mean ± std over the runs (N times the time)
#   QUICKSTART_STRATEGIES="raw raw_top synthetic raw_top_synthetic best_of"   the selections to train and
#                                evaluate (all five are always made: that is cheap)
#   QUICKSTART_POOL, QUICKSTART_SEED_SPLIT, QUICKSTART_EVAL, QUICKSTART_IMAGE_SIZE,
#   QUICKSTART_CAPTIONER_SAMPLES, QUICKSTART_SCORER_SAMPLES, QUICKSTART_TRAIN_SAMPLES,
#   QUICKSTART_BATCH_SIZE, QUICKSTART_CAPTIONER_BATCH_SIZE, QUICKSTART_CAPTIONER_LR, QUICKSTART_TOP_FRACTION,
#   QUICKSTART_NOISE_PROFILE, QUICKSTART_CLIP_MODEL, QUICKSTART_CAPTIONER_MODEL, QUICKSTART_WORKERS
#                                override the scale's values (models: a config name under world/models/)
set -euo pipefail

SCALE=${QUICKSTART_SCALE:-demo}
case "$SCALE" in
  demo) pool=3000 seed_split=8000 n_eval=4800 img=64 cap_samples=32000 scorer_samples=6000 train_samples=5000
        bs=32 cap_bs=32 cap_lr=5e-4 clip=tiny_clip coca=tiny_coca ;;
  tiny) pool=96 seed_split=64 n_eval=96 img=32 cap_samples=64 scorer_samples=64 train_samples=64
        bs=32 cap_bs=32 cap_lr=5e-4 clip=tiny_clip coca=tiny_coca ;;
  gpu)  pool=20000 seed_split=20000 n_eval=9600 img=64 cap_samples=400000 scorer_samples=100000 train_samples=100000
        bs=256 cap_bs=256 cap_lr=1e-3 clip=small_clip coca=small_coca ;;
  *) echo "error: QUICKSTART_SCALE must be demo, tiny or gpu, got '$SCALE'" >&2; exit 2 ;;
esac
OUT=${QUICKSTART_OUT:-demo_out}
SEED=${QUICKSTART_SEED:-0}
SEEDS=${QUICKSTART_SEEDS:-1}
POOL=${QUICKSTART_POOL:-$pool}
SEED_SPLIT=${QUICKSTART_SEED_SPLIT:-$seed_split}
N_EVAL=${QUICKSTART_EVAL:-$n_eval}
IMG=${QUICKSTART_IMAGE_SIZE:-$img}
CAP_SAMPLES=${QUICKSTART_CAPTIONER_SAMPLES:-$cap_samples}
SCORER_SAMPLES=${QUICKSTART_SCORER_SAMPLES:-$scorer_samples}
TRAIN_SAMPLES=${QUICKSTART_TRAIN_SAMPLES:-$train_samples}
BS=${QUICKSTART_BATCH_SIZE:-$bs}
CAP_BS=${QUICKSTART_CAPTIONER_BATCH_SIZE:-$cap_bs}
CAP_LR=${QUICKSTART_CAPTIONER_LR:-$cap_lr}
CLIP_MODEL=${QUICKSTART_CLIP_MODEL:-$clip}
COCA_MODEL=${QUICKSTART_CAPTIONER_MODEL:-$coca}
WORKERS=${QUICKSTART_WORKERS:-auto}  # auto: in-process decoding on a few CPU cores, loader processes on a GPU
TOP=${QUICKSTART_TOP_FRACTION:-0.3}
NOISE=${QUICKSTART_NOISE_PROFILE:-web}
FETCH=${QUICKSTART_FETCH:-download}
STORE=${QUICKSTART_STORE:-}  # a URL (s3://bucket/prefix): the dataset, the training shards and the runs go there
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

command -v capcurate >/dev/null || { echo "error: capcurate is not on PATH (run 'make demo', or put .venv/bin on PATH)" >&2; exit 2; }
case "$FETCH" in download|ingest) ;; *) echo "error: QUICKSTART_FETCH must be download or ingest, got '$FETCH'" >&2; exit 2 ;; esac
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "error: QUICKSTART_SEEDS must be a positive whole number, got '$SEEDS'" >&2; exit 2; }
MARKER="$OUT/.capcurate-quickstart"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  [ -e "$MARKER" ] || { echo "error: $OUT exists and was not made by this script; set QUICKSTART_OUT to another folder" >&2; exit 3; }
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
touch "$MARKER"
START=$(date +%s)

if [ "$SEEDS" -gt 1 ]; then
  # one complete, independent run per seed (world, captioner, scorer, CLIPs), then one table over them
  for k in $(seq "$SEED" $(( SEED + SEEDS - 1 ))); do
    echo "== seed $k of $SEED..$(( SEED + SEEDS - 1 ))" >&2
    QUICKSTART_OUT="$OUT/seed_$k" QUICKSTART_SEED=$k QUICKSTART_SEEDS=1 QUICKSTART_STORE=${STORE:+$STORE/seed_$k} \
      bash "${BASH_SOURCE[0]}"
  done
  echo "+ $PY $HERE/results_table.py $OUT --top-fraction $TOP" >&2
  "$PY" "$HERE/results_table.py" "$OUT" --top-fraction "$TOP"
  echo "done: $SEEDS seeds in $(( $(date +%s) - START ))s: $OUT/results.md, $OUT/results.json, $OUT/results.png" >&2
  exit 0
fi

WORLD="$OUT/world" DS="$OUT/dataset" RUNS="$OUT/runs" SHARDS="$OUT/shards" EVALS="$OUT/evals"
mkdir -p "$EVALS"
if [ -n "$STORE" ]; then
  # object storage (docs/storage.md): the world (served over HTTP) and the eval JSONs stay in $OUT
  "$PY" - "$STORE" <<'PYEOF' || exit $?
import sys
from capcurate import storage
from capcurate.errors import CapcurateError
try:
    storage.check_container(sys.argv[1])
    left = storage.list_entries(sys.argv[1])
except CapcurateError as e:
    sys.exit(f"error: QUICKSTART_STORE: {e}")
if left:
    print(f"error: QUICKSTART_STORE={sys.argv[1]} is not empty; give the quickstart a fresh prefix", file=sys.stderr)
    sys.exit(3)
PYEOF
  DS="$STORE/dataset" RUNS="$STORE/runs" SHARDS="$STORE/shards"
  echo "$STORE" > "$OUT/store.txt"
fi
export CAPCURATE_PROGRESS=${CAPCURATE_PROGRESS:-0} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() { echo "+ $*" >&2; "$@"; }
STEP_NAMES=() STEP_SECS=() STEP_T0=$START
end_step() {  # close the step that is running: record its seconds
  if [ "${#STEP_NAMES[@]}" -gt 0 ]; then STEP_SECS+=($(( $(date +%s) - STEP_T0 ))); fi
  STEP_T0=$(date +%s)
}
step() { end_step; STEP_NAMES+=("${1%%:*}"); echo >&2; echo "== [$(( $(date +%s) - START ))s] $*" >&2; }
# training options shared by every run; `--train-num-samples N --epochs 1` fixes the compute (samples seen)
TRAIN_OPTS=(--epochs 1 --wd 0.1 --workers "$WORKERS" --seed "$SEED")
CLIP_OPTS=(--batch-size "$BS" --lr 1e-3 --warmup 10 "${TRAIN_OPTS[@]}")

step "1/9 synth: render CapWorld ($POOL pool, $SEED_SPLIT seed, $N_EVAL eval images at ${IMG}px, noise profile $NOISE)"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
POOL_SHARDS=()
[ "$FETCH" = ingest ] && POOL_SHARDS=(--pool-shards)
run capcurate synth -o "$WORLD" --n-images "$POOL" --seed-size "$SEED_SPLIT" --eval-size "$N_EVAL" \
  --image-size "$IMG" --noise-profile "$NOISE" --seed "$SEED" --base-url "http://127.0.0.1:$PORT" --contact-sheet \
  "${POOL_SHARDS[@]}"

if [ "$FETCH" = ingest ]; then
  step "2/9 ingest: adopt the pool's webdataset shards (QUICKSTART_FETCH=ingest: no HTTP, no img2dataset)"
  run capcurate ingest "$WORLD/pool" -o "$DS"
else
  step "2/9 download: serve the world's images on http://127.0.0.1:$PORT and download them"
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
fi

step "3/9 captioner: train a CoCa on the clean seed split ($CAP_SAMPLES samples)"
run capcurate train "$WORLD/seed" -o "$RUNS/captioner" --model-config "$WORLD/models/$COCA_MODEL.json" --loss coca \
  --train-num-samples "$CAP_SAMPLES" --batch-size "$CAP_BS" --lr "$CAP_LR" --warmup 100 "${TRAIN_OPTS[@]}"

step "4/9 recaption: a synthetic caption for every pool image"
run capcurate recaption "$DS" --model "$RUNS/captioner" --name coca --decoding greedy --max-new-tokens 24

step "5/9 score: train a CLIP scorer on the seed split ($SCORER_SAMPLES samples), score raw + synthetic captions"
run capcurate train "$WORLD/seed" -o "$RUNS/scorer" --model-config "$WORLD/models/$CLIP_MODEL.json" \
  --train-num-samples "$SCORER_SAMPLES" "${CLIP_OPTS[@]}"
run capcurate score "$DS" --model "$RUNS/scorer" --name clip --captions raw,coca

step "6/9 filter + mix: five ways to choose the training captions"
run capcurate mix "$DS" --strategy raw --name raw
run capcurate filter "$DS" --name raw_top --score clip:raw --top-fraction "$TOP"
run capcurate mix "$DS" --strategy synthetic --synthetic coca --name synthetic
run capcurate mix "$DS" --strategy raw-top+synthetic --synthetic coca --score clip --top-fraction "$TOP" --name raw_top_synthetic
run capcurate mix "$DS" --strategy best --synthetic coca --score clip --name best_of
read -r -a STRATEGIES <<< "${QUICKSTART_STRATEGIES:-raw raw_top synthetic raw_top_synthetic best_of}"

step "7/9 shard: each selection"
for s in "${STRATEGIES[@]}"; do
  run capcurate shard "$DS" --selection "$s" -o "$SHARDS/$s" --samples-per-shard 1000 --min-shards 2 --shuffle --seed "$SEED"
done

step "8/9 train + eval: one CLIP per strategy on the same compute ($TRAIN_SAMPLES samples seen each), evaluated"
for s in "${STRATEGIES[@]}"; do
  run capcurate train "$SHARDS/$s" -o "$RUNS/$s" --model-config "$WORLD/models/$CLIP_MODEL.json" \
    --train-num-samples "$TRAIN_SAMPLES" "${CLIP_OPTS[@]}"
  run capcurate eval "$RUNS/$s" --data "$WORLD/eval" --output "$EVALS/$s.json"
done

step "9/9 results"
run "$PY" "$HERE/results_table.py" "$OUT" --top-fraction "$TOP"
end_step
{
  printf 'step\tseconds\n'
  for i in "${!STEP_NAMES[@]}"; do printf '%s\t%s\n' "${STEP_NAMES[$i]}" "${STEP_SECS[$i]}"; done
  printf 'total\t%s\n' "$(( $(date +%s) - START ))"
} > "$OUT/timings.tsv"
echo >&2
echo "seconds per step:" >&2
column -t -s $'\t' "$OUT/timings.tsv" >&2 2>/dev/null || cat "$OUT/timings.tsv" >&2
echo "done in $(( $(date +%s) - START ))s: $OUT/results.md, $OUT/results.json, $OUT/results.png" >&2
