#!/usr/bin/env bash
# Issue 7, in one call of the device tool on a machine of 2 GPUs (nvidia-h200-x2):
#   1. FSDP2, 2 processes, the ~300 M config for 30 steps on a data mix where rank 0 has only image samples and
#      rank 1 only text (benchmarks/make_mixed_data.py): nothing may hang; final/ reloads with the same logits.
#   2. the same under DeepSpeed ZeRO-3;
#   3. resume: kill after the step-10 checkpoint, resume on 2 processes, compare the loss curve with run 1;
#   4. tokens/s per GPU, 2 processes against 1, on the same config (scaling efficiency).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the device tool requires.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/multi_gpu}; mkdir -p "$OUT"
nvidia-smi -L
python3 benchmarks/make_mixed_data.py /tmp/mixed.parquet --samples 4000
MIXED=(--dataset parquet --data_files /tmp/mixed.parquet --data_format interleaved)
train() {  # name, accelerate config, processes, extra args...
  local name=$1 config=$2 procs=$3; shift 3
  timeout 900 accelerate launch --config_file examples/accelerate/$config.yaml --num_processes "$procs" examples/train.py \
    --config examples/configs/gpu_300m.yaml --output_dir /tmp/runs/$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; cp /tmp/runs/$name/report.json "$OUT/report_$name.json" 2>/dev/null
}
train fsdp2_x2 fsdp2 2 "${MIXED[@]}"
train zero3_x2 deepspeed_zero3 2 "${MIXED[@]}"
# Resume: start the FSDP2 run again, kill it once step-10 exists, resume, and compare the curves.
accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 examples/train.py \
  --config examples/configs/gpu_300m.yaml --output_dir /tmp/runs/resume_x2 "${MIXED[@]}" > "$OUT/resume_first.log" 2>&1 &
launcher=$!
until [ -d /tmp/runs/resume_x2/checkpoints/step-10 ] || ! kill -0 $launcher 2>/dev/null; do sleep 1; done
pkill -9 -f "output_dir /tmp/runs/resume_x2"; wait $launcher 2>/dev/null
train resume_x2 fsdp2 2 "${MIXED[@]}" --resume_from_checkpoint latest
# Scaling: the same config on scenes, 1 process and 2.
train scale_x1 fsdp2 1 --checkpoint_every 0
train scale_x2 fsdp2 2 --checkpoint_every 0
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def report(name):
    path = out / f"report_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
for name in ("fsdp2_x2", "zero3_x2", "resume_x2"):
    r = report(name)
    print(name, None if r is None else {k: r.get(k) for k in ("steps", "train_loss_last", "final_reload_max_abs_diff")})
full, resumed = report("fsdp2_x2"), report("resume_x2")
if full and resumed:
    tail = resumed["loss_curve"]
    print("resume: max |loss difference| over the whole curve:",
          max(abs(a - b) for a, b in zip(full["loss_curve"][-len(tail):], tail)))
one, two = report("scale_x1"), report("scale_x2")
if one and two:
    per_gpu = two["tokens_per_second_wall"] / 2
    print(f"scaling: {one['tokens_per_second_wall']:.0f} tokens/s on 1 GPU, {per_gpu:.0f} per GPU on 2: "
          f"efficiency {per_gpu / one['tokens_per_second_wall']:.1%}")
PY
