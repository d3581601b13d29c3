#!/usr/bin/env bash
# GPU smoke run of the BCI profile: synthetic 1024 px BCI-layout data, the three training stages for a few hundred
# iterations each, AMP off and on; prints samples/s and images/s per stage and the peak GPU memory, and writes
# speed.json. Extra arguments go to benchmarks/bci_profile_speed.py, e.g.:
#   bash scripts/gpu_smoke.sh                                   # cuda, 300 iterations per stage
#   bash scripts/gpu_smoke.sh --iterations 100 --amp on
#   WORK=/scratch/her2 bash scripts/gpu_smoke.sh --device cuda:1
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:-/tmp/her2_bci_speed}"
mkdir -p "$work"
python benchmarks/bci_profile_speed.py --device cuda --iterations 300 --work "$work" --json "$work/speed.json" "$@"
