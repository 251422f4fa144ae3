#!/usr/bin/env bash
# The real-scale recipe: DataComp "small" pool -> BLIP-2 recaption -> ViT-L/14 scoring -> the paper's
# best mix (raw top-30% by CLIP score, BLIP-2 captions for the rest) -> shards -> ViT-B/32 training -> eval.
# It is the quickstart's chain (pipelines/quickstart.sh) with real models; not run in CI.
#
#   bash pipelines/datacomp_small.sh --dry-run      # print the commands, run nothing
#   bash pipelines/datacomp_small.sh                # run them (needs GPUs, weights, the pool's metadata)
#
# Inputs (environment variables):
#   POOL_METADATA   DataComp small's metadata Parquet files (uid, url, text), e.g. datacomp/small/metadata
#   WORK=work       where the dataset, shards and runs go (about 0.5 TB for 12.8M images at 256 px)
#   EVAL_DATA       an eval set in clip_benchmark's webdataset layout (e.g. a local copy of wds_imagenet1k)
#   NGPU=8          GPUs on this machine (recaption/score use --engine ray with one actor per GPU)
#
# Cost, estimated from throughput (not measured here; A100-80GB, bf16/fp16):
#   download     12.8M URLs, CPU and network bound: ~1 day on 16 cores (img2dataset, ~150 img/s); no GPU
#   recaption    BLIP-2 OPT-2.7B, nucleus top-p 0.9, ~80 img/s per GPU      -> ~45 GPU-hours (dominates)
#   score        ViT-L/14 image + 2 captions, ~1000 img/s per GPU          -> ~4 GPU-hours
#   train        ViT-B/32, 12.8M samples seen (DataComp small's budget),
#                ~1500 samples/s per GPU                                   -> ~2.5 GPU-hours
#   total        about 50-55 GPU-hours, i.e. under 8 hours on one 8-GPU node
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) DRY_RUN=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done

POOL_METADATA=${POOL_METADATA:-datacomp/small/metadata}
WORK=${WORK:-work}
EVAL_DATA=${EVAL_DATA:-eval/wds_imagenet1k}
NGPU=${NGPU:-8}
DS="$WORK/pool"

run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# 1. images: img2dataset does the work; uid comes from the metadata, so every later join is on DataComp's uid
run capcurate download "$POOL_METADATA" -o "$DS" --url-col url --caption-col text --uid-col uid \
  --image-size 256 --resize-mode keep_ratio --processes 16 --threads 64 --samples-per-shard 10000
# 2. DataComp basic filtering (English, caption length, image size, aspect ratio) as the candidate pool
run capcurate filter "$DS" --basic --name basic
# 3. synthetic captions: BLIP-2, nucleus sampling as in "Improving Multimodal Datasets with Image Captioning"
run capcurate recaption "$DS" --model hf:Salesforce/blip2-opt-2.7b --name blip2 --decoding nucleus --top-p 0.9 \
  --max-new-tokens 30 --precision fp16 --engine ray
# 4. CLIP scores of the raw and the synthetic caption with OpenAI's ViT-L/14
run capcurate score "$DS" --model openclip:ViT-L-14/openai --name l14 --captions raw,blip2 \
  --batch-size 512 --precision fp16 --save-embeddings --engine ray
# 5. the best mix: raw captions for the top 30% by L/14 score, BLIP-2 captions for the rest
run capcurate mix "$DS" --strategy raw-top+synthetic --synthetic blip2 --score l14 --top-fraction 0.3 \
  --from-selection basic --name raw_top30_blip2
# 6. training shards, shuffled once, readable by capcurate train and by open_clip's own trainer
run capcurate shard "$DS" --selection raw_top30_blip2 -o "$WORK/shards/raw_top30_blip2" \
  --samples-per-shard 10000 --min-shards 64 --shuffle --seed 0
# 7. ViT-B/32 on DataComp small's budget: 12.8M samples seen, global batch 4096
run capcurate train "$WORK/shards/raw_top30_blip2" -o "$WORK/runs/b32_raw_top30_blip2" --model ViT-B-32 \
  --nproc "$NGPU" --batch-size $((4096 / NGPU)) --epochs 1 --train-num-samples 12800000 --lr 5e-4 \
  --warmup 500 --wd 0.2 --precision bf16 --workers 8 --local-loss --gather-with-grad
# 8. zero-shot classification and retrieval
run capcurate eval "$WORK/runs/b32_raw_top30_blip2" --data "$EVAL_DATA" --device cuda \
  --output "$WORK/runs/b32_raw_top30_blip2/eval.json"
