#!/usr/bin/env bash
# Training throughput, honestly measured, in one call of the device tool on one H100 (about 8 minutes):
#   the padded baseline twice (first and last, separate processes), packed rows and each optimisation on top
#   (chunked loss, grouped position resize, flex decoder attention, compiled layers = "all"), the candidates on top of
#   "all" (Liger's fused linear cross-entropy when its wheel is in .whl/, compile mode max-autotune-no-cudagraphs if
#   time is left), the profile of "all" (phases and kernel kinds), and the graph-count check on varied images
#   (encoder dynamic vs padded-length buckets). Every run is a fresh process; see benchmarks/bench_train.py.
# Writes $OUT/bench_train.json, $OUT/bench_train.md, $OUT/bench_train.log (3 files).
#   bash benchmarks/gpu_bench.sh            (BUDGET=450 seconds for the runs; STEPS=30 timed steps a run)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
variants=baseline,packed,packed+loss,packed+loss+pos,packed+loss+pos+flex,all
if python3 -c "import liger_kernel" 2>/dev/null; then variants+=,all+liger; else echo "liger_kernel missing: no all+liger"; fi
variants+=,all+autotune  # last before the second baseline: skipped when the budget is short
python3 benchmarks/bench_train.py --variants "$variants" --graph-check --profile all \
  --steps "${STEPS:-30}" --time-budget "${BUDGET:-450}" --out "$OUT" > "$OUT/driver.txt" 2>&1
status=$?
# The driver's own lines go to the end of the log (one file fewer to bring back); the tables print last.
{ echo; echo "===== driver (exit $status)"; cat "$OUT/driver.txt"; } >> "$OUT/bench_train.log"; rm -f "$OUT/driver.txt"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
grep -E "^\[" "$OUT/bench_train.log" | tail -20
cat "$OUT/bench_train.md" 2>/dev/null | head -40
exit $status
