#!/usr/bin/env bash
# Paired comparisons of each tuned method with its tuned baseline on the same test queries
# (python -m dml compare: bootstrap intervals over queries, McNemar's test of R@1), seed 0's
# fold models concatenated. Usage, from the repository root, after run.sh:
#   bash experiments/results/omniglot_small/equal_budget/compare.sh ROOT [A:B ...] > compare.txt
set -euo pipefail
ROOT=$1; shift
R=runs/mlrc/omniglot_small
PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(gap:gsp_zero_shot c2:c2_ccp ibc_no_mpn:ibc no_memory:xbm no_memory:xbn no_memory:adaptive_xbn)
for pair in "${PAIRS[@]}"; do
  a=${pair%%:*}; b=${pair##*:}
  echo "### $a (A) vs $b (B)"
  echo '```text'
  echo "\$ python -m dml compare $R/$a $R/$b --root \$ROOT --mlrc-seed 0"
  python -m dml compare "$R/$a" "$R/$b" --root "$ROOT" --mlrc-seed 0
  echo '```'
  echo
done
