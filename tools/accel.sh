#!/usr/bin/env bash
# Runs on the accelerator machine (no package index there): build ktrans from the source snapshot
# carried in .dev-carry/src.tar, then run the named steps, logging under $OUT.
#
#   here:  git archive --format=tar HEAD -o .dev-carry/src.tar   (and ../shared/tools/device-wheels.sh
#          --kt-kernel --server for the wheels)
#   there: bash tools/accel.sh STEP [STEP ...]   where STEP is a shell snippet run in the build tree,
#          e.g. 'python3 -m pytest -q -m gpu tests' or 'python3 bench/moe.py --json $OUT/moe.json'
set -uo pipefail
OUT=${OUT:-/tmp/accel-out}
mkdir -p "$OUT"
carry=$(cd "$(dirname "$0")/.." && pwd)/.dev-carry
source "$carry/unpack.sh"
rm -rf /tmp/ktrans-src && mkdir -p /tmp/ktrans-src && tar -xf "$carry/src.tar" -C /tmp/ktrans-src
cd /tmp/ktrans-src
if ! python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python3 -m ktrans info | tee "$OUT/info.txt"
export PYTHONUNBUFFERED=1
i=0
for step in "$@"; do
  i=$((i + 1))
  echo "=== step $i: $step" | tee -a "$OUT/steps.log"
  start=$(date +%s)
  bash -c "$step" > "$OUT/step$i.log" 2>&1
  rc=$?
  echo "=== step $i rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/step$i.log"
done
