#!/usr/bin/env bash
# Issue 28's equal-budget comparison on the Omniglot subsets (CPU): for each of the ten rows,
# python -m dml.tune (12 trials, the same 4-dimensional space size, validation fold 0 of the
# training classes, 4 epochs at 32 px), then python -m dml.mlrc with the best config (3 seeds x
# 4 fold models, test split). Usage, from the repository root:
#   bash experiments/results/omniglot_small/equal_budget/run.sh ROOT [ROW ...]
# ROOT: the folder holding images_background_small1.zip and _small2.zip. Rows run one after
# the other; two invocations with disjoint ROWs share a 2-core machine (OMP_NUM_THREADS=1 each).
# Each row's mlrc output goes to runs/equal_budget/<row>/ (merged afterwards by merge.py).
set -euo pipefail
ROOT=$1; shift
HERE=experiments/results/omniglot_small
SPACES=$HERE/tune/spaces
B=(--dataset omniglot_small --epochs 4 --size 32 --root "$ROOT")
declare -A METHOD=(
  [gap]=contrastive [gsp_zero_shot]=gsp_contrastive [c2]=ccp_c2 [c2_ccp]=ccp_c2
  [no_memory]=none_memory [xbm]=xbm [xbn]=xbn [adaptive_xbn]=adaptive_xbn
  [ibc]=ibc [ibc_no_mpn]=ibc)
declare -A EXTRA=(
  [c2]="--model.loss.proxies_per_class 0 --ccp.enabled false"
  [ibc_no_mpn]="--model.ibc.mpn_weight 0")
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(gap gsp_zero_shot c2 c2_ccp no_memory xbm xbn adaptive_xbn ibc ibc_no_mpn)
for row in "${ROWS[@]}"; do
  method=${METHOD[$row]}
  read -r -a extra <<< "${EXTRA[$row]:-}"
  python -m dml.tune "${B[@]}" --method "$method" --name "$row" --space "$SPACES/$row.yaml" \
    --trials 12 --folds 0 --seed 0 --out experiments/results -- "${extra[@]}"
  python -m dml.mlrc "${B[@]}" --method "$method" --name "$row" --seeds 0 1 2 \
    --config "$HERE/tune/$row.best.yaml" --out "runs/equal_budget/$row" -- "${extra[@]}"
done
# Added after the searches: the no-memory row at the learning rate the XBM and XBN searches
# chose (not searched), to tell the rate from the memory:
#   python -m dml.mlrc "${B[@]}" --method none_memory --name no_memory_at_xbm_lr --seeds 0 1 2 \
#     --config experiments/results/omniglot_small/equal_budget/no_memory_at_xbm_lr.yaml \
#     --out runs/equal_budget/no_memory_at_xbm_lr
