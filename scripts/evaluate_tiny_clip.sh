#!/usr/bin/env bash
# The small CLIP's figures (assets/tiny-clip-tinyimagenet/RESULTS.md): zero-shot on the 10,000 val
# images, the SAE on its 20,000-image train-split cache, every method, PASS, and the feature browser.
# Everything through the `vision-steer` CLI; about 10 minutes on 2 shared CPU cores.
#
#   scripts/evaluate_tiny_clip.sh [DATA_DIR] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/tiny-imagenet-200}
OUT=${2:-runs/tiny-clip}
MODEL=local-dir:assets/tiny-clip-tinyimagenet
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--dataset tiny-imagenet --data-dir "$DATA" --num-workers 1)
ALL=zeroshot,vs2,rec_final,rec_final_gamma,vs2pp,vs2pp_majority,vs2pp_oracle,clip_steer,clip_steer_oracle,weighted_rag,weighted_rag_oracle

mkdir -p "$OUT"
vision-steer zeroshot --model "$MODEL" "${COMMON[@]}" --split val --out "$OUT/zeroshot_val.json"
# the README's offline example: cache the train split, train the SAE (4x, k 16), zero-shot/VS2/baselines
vision-steer run --model "$MODEL" "${COMMON[@]}" --k 16 --expansion 4 --out "$OUT/run"
# every method, VS2 gated at the 0.99 quantile of the training FVU (the paper's gate), VS2++ pool = train cache
vision-steer eval --sae "$OUT/run/sae" "${COMMON[@]}" --split val --methods "$ALL" \
    --fvu-quantile 0.99 --reference-cache "$OUT/run/cache_train" --pool-cache "$OUT/run/cache_train" \
    --out "$OUT/eval_all" --overwrite
# PASS: the same SAE size with the prototype loss (w_aux 0.8), then VS2 with it
vision-steer train --cache "$OUT/run/cache_train" --objective pass --w-aux 0.8 --k 16 --expansion 4 \
    --out "$OUT/sae_pass" --resume
vision-steer eval --sae "$OUT/sae_pass" "${COMMON[@]}" --split val --methods zeroshot,vs2,rec_final \
    --fvu-quantile 0.99 --reference-cache "$OUT/run/cache_train" --out "$OUT/eval_pass" --overwrite
# the feature browser of the SAE over its training cache, with the VS2 per-class changes
vision-steer features --cache "$OUT/run/cache_train" --sae "$OUT/run/sae" --results "$OUT/eval_all/results.json" \
    --out "$OUT/features"
