#!/usr/bin/env bash
# The GPU checks, in one call of the device tool (one H100): bf16/sdpa parity and generation tests, then 20 steps
# of the ~100 M config under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (one process each), each reloading final/.
# Missing packages travel as wheels in .whl/ (deepspeed, datasets, torchdata and their needs).
#   bash benchmarks/gpu_checks.sh [tests] [train]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
python3 -c "import torch, transformers, accelerate, peft, datasets, pyarrow, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" 2>&1 | tail -3
steps=${*:-tests train}
status=0
if [[ " $steps " == *" tests "* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -15 || status=1
fi
if [[ " $steps " == *" train "* ]]; then
  for backend in ${BACKENDS:-fsdp2 deepspeed_zero2 deepspeed_zero3}; do
    echo "== $backend"
    accelerate launch --config_file examples/accelerate/$backend.yaml --num_processes 1 examples/train.py \
      --config examples/configs/gpu_100m.yaml --output_dir /tmp/runs/$backend > "$OUT/train_$backend.log" 2>&1
    echo "exit $?"; grep -E "^model|^setup|final_reload|train_loss|tokens_per_second|Error|error" "$OUT/train_$backend.log" | tail -12
    cp /tmp/runs/$backend/report.json "$OUT/report_$backend.json" 2>/dev/null
  done
fi
exit $status
