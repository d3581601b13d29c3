#!/usr/bin/env bash
# Whole-slide throughput before and after a change, measured alternately so that both trees see the same load.
#
# Usage: bash benchmarks/wsi_before_after.sh BEFORE_COMMIT BUNDLE [SVS_RUNS=5] [SYNTHETIC_RUNS=1] [SYNTHETIC_TIF]
#   BEFORE_COMMIT   the tree to compare with (checked out in a temporary git worktree); "after" is this checkout
#   BUNDLE          a bundle folder with models/model.pt (README command 1's `bundle`)
#   SYNTHETIC_TIF   a slide written by bench_wsi.write_synthetic_slide (default: written once into the temp folder)
# Each run is `benchmarks/bench_wsi.py --measure wsi` of its own tree in its own process (2 threads, batch 16): the real
# SVS at 256 px tiles, the 20k x 20k synthetic slide at 512 px tiles. Prints every run and the median ratio.
set -euo pipefail
BEFORE=${1:?before commit}; BUNDLE=$(realpath "${2:?bundle folder}"); SVS_RUNS=${3:-5}; SYN_RUNS=${4:-1}
AFTER=$(git rev-parse --show-toplevel)
SVS="$AFTER/../shared/data/wsi/cmu_small_region.svs"
WORK=$(mktemp -d)
trap 'git -C "$AFTER" worktree remove --force "$WORK/before" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git -C "$AFTER" worktree add --detach "$WORK/before" "$BEFORE" >/dev/null
SYN=${5:-}
if [ "$SYN_RUNS" -gt 0 ] && [ -z "$SYN" ]; then
  SYN="$WORK/synthetic.tif"
  (cd "$AFTER/benchmarks" && python -c "from pathlib import Path; from bench_wsi import write_synthetic_slide as w; w(Path('$SYN'))")
fi
measure() {  # tree slide tile_size label
  (cd "$1" && PYTHONPATH="$1" python benchmarks/bench_wsi.py --measure wsi "$2" --bundle "$BUNDLE" --tile-size "$3" \
    --batch-size 16 --threads 2 2>/dev/null | tail -1 | sed "s/^/$4 /")
}
{
  for _ in $(seq 1 "$SVS_RUNS"); do
    measure "$WORK/before" "$SVS" 256 "svs before"; measure "$AFTER" "$SVS" 256 "svs after"
  done
  for _ in $(seq 1 "$SYN_RUNS"); do
    measure "$WORK/before" "$SYN" 512 "synthetic before"; measure "$AFTER" "$SYN" 512 "synthetic after"
  done
} | python -c '
import json, statistics, sys
runs = {}
for line in sys.stdin:
    slide, when, record = line.split(" ", 2)
    r = json.loads(record)
    rate = r["tiles"] / r["seconds"]
    runs.setdefault(slide, {}).setdefault(when, []).append(rate)
    print("%-9s %-6s %5d tiles %7.2f s %7.2f tiles/s  peak RSS %.0f MB" % (slide, when, r["tiles"], r["seconds"], rate,
          r["peak_rss_mb"]), flush=True)
for slide, rates in runs.items():
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    pairs = ", ".join("%.2fx" % (a / b) for b, a in zip(rates["before"], rates["after"]))
    print("%s: median %.2f -> %.2f tiles/s = %.2fx; per pair %s" % (slide, before, after, after / before, pairs))
'
