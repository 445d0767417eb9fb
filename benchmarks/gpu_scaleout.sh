#!/usr/bin/env bash
# The scale-out checks, on one machine of 4 GPUs (nvidia-h100-x4), in three calls of the device tool:
#
#   bash benchmarks/gpu_scaleout.sh correctness  # DDP, FSDP2, ZeRO-2, ZeRO-3 on 2 and 4 GPUs, mixed data, 30 steps
#   bash benchmarks/gpu_scaleout.sh resume       # exact resume, 2 -> 4 and 4 -> 2 GPUs, ZeRO refusal, two nodes
#   bash benchmarks/gpu_scaleout.sh speed        # tokens/s per GPU on 1, 2 and 4 GPUs, ZeRO-3 vs FSDP2, 8B on 4
#
# `resume` reads the checkpoints `correctness` left in /tmp/runs, so both run on the same warm machine.
# Each run's log goes into $OUT/logs.tar.gz; $OUT/<phase>.json and .md hold the verdicts (benchmarks/scaleout_report.py).
# CPU rehearsal of the orchestration (DDP only, gloo, tiny model): DRY=1 bash benchmarks/gpu_scaleout.sh correctness
# NVLink multicast stays off (gpu_env.sh). Runs are stopped by process group, never by name.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/scaleout_out}; RUNS=${RUNS:-/tmp/runs}; LOGS=$RUNS/logs
mkdir -p "$OUT" "$RUNS" "$LOGS"
phase=${1:?correctness, resume or speed}
DRY=${DRY:-0}
PORT=29500

if [ "$DRY" = 1 ]; then
  BACKENDS=(ddp); MODEL=(--config "" --text_hidden_size 64 --text_intermediate_size 128 --text_heads 2 --text_kv_heads 1
    --vision_hidden_size 32 --vision_intermediate_size 64 --vision_heads 2 --text_layers 2 --vision_layers 1
    --patch_size 8 --spatial_merge_size 2 --min_patches 4 --max_patches 64 --vocab_size 320
    --learning_rate 0.002 --warmup_steps 3 --eval_samples 0 --eval_before false --report_to none)
  SEQ=(--seq_len 512 --rows_per_batch 1)
else
  BACKENDS=(ddp fsdp2 deepspeed_zero2 deepspeed_zero3)
  MODEL=(--config examples/configs/gpu_100m.yaml --compile false)
  SEQ=(--seq_len 2048 --rows_per_batch 2)
fi
MIXED=(--dataset parquet --data_files /tmp/mixed.parquet --data_format interleaved --num_workers 2)

# launch NAME BACKEND GPUS ARGS...: start one accelerate (GPU) or torchrun (DRY) job in its own process group (so
# that it can be stopped whole) and set PID to it. Each job gets its own rendezvous port, derived from its name.
launch() {
  local name=$1 backend=$2 gpus=$3; shift 3
  local procs; procs=$(awk -F, '{print NF}' <<<"$gpus")
  local port=$((29500 + $(cksum <<<"$name" | cut -d' ' -f1) % 1000))
  if [ "$DRY" = 1 ]; then
    setsid python3 -m torch.distributed.run --nproc_per_node "$procs" --master_port $port examples/train.py "$@" \
      > "$LOGS/$name.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=$gpus setsid accelerate launch --config_file "examples/accelerate/$backend.yaml" \
      --num_processes "$procs" --main_process_port $port examples/train.py "$@" > "$LOGS/$name.log" 2>&1 &
  fi
  PID=$!
}

# run NAME BACKEND GPUS ARGS...: launch and wait, at most $LIMIT seconds (a hang is killed and reported).
run() {
  local name=$1; launch "$@"; local pid=$PID
  local waited=0
  while kill -0 "$pid" 2>/dev/null && [ $waited -lt "${LIMIT:-300}" ]; do sleep 1; waited=$((waited + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 -- -"$pid" 2>/dev/null; echo "TIMEOUT after ${waited}s" >> "$LOGS/$name.log"
  fi
  wait "$pid" 2>/dev/null; local rc=$?
  echo "EXIT $rc after ${waited}s" >> "$LOGS/$name.log"; echo "$name: exit $rc after ${waited}s"
}

# kill_after_checkpoint NAME STEP BACKEND GPUS ARGS...: SIGKILL the whole job once checkpoints/step-STEP exists.
kill_after_checkpoint() {
  local name=$1 step=$2; shift 2
  launch "$name" "$@"; local pid=$PID
  local waited=0
  until [ -d "$RUNS/$name/checkpoints/step-$step" ] || ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 600 ]; do
    sleep 0.5; waited=$((waited + 1))
  done
  kill -9 -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  mv "$LOGS/$name.log" "$LOGS/${name}_before_kill.log"
  echo "$name: killed after step-$step ($(ls -a "$RUNS/$name/checkpoints" 2>/dev/null | tr '\n' ' '))"
}

# args NAME: the arguments every run of the correctness and resume phases shares, into the array A.
args() {
  A=("${MODEL[@]}" "${SEQ[@]}" "${MIXED[@]}" --max_steps 30 --checkpoint_every 10 --keep_checkpoints 3
     --check_final_reload true --output_dir "$RUNS/$1" --log_sample_ids true)
}

case $phase in
correctness)
  nvidia-smi -L 2>/dev/null
  python3 benchmarks/make_mixed_data.py /tmp/mixed.parquet --samples ${SAMPLES:-3000} > /dev/null
  # Two 2-GPU jobs side by side, then the 4-GPU ones. The ZeRO-3 runs are the known hang; LIMIT catches one.
  for pair in "0 1" "2 3"; do
    a=${BACKENDS[${pair% *}]:-}; b=${BACKENDS[${pair#* }]:-}
    [ -n "$a" ] && { args "${a}_x2"; run "${a}_x2" "$a" 0,1 "${A[@]}" & }
    [ -n "$b" ] && { args "${b}_x2"; run "${b}_x2" "$b" 2,3 "${A[@]}" & }
    wait
  done
  if [ "$DRY" = 1 ]; then
    args ddp_x3; run ddp_x3 ddp 0,1,2 "${A[@]}"
  else
    for backend in "${BACKENDS[@]}"; do args "${backend}_x4"; run "${backend}_x4" "$backend" 0,1,2,3 "${A[@]}"; done
  fi
  ;;
quick)
  # What a few minutes of a 4-GPU machine allow: the two runs that failed in the issue (ZeRO-3 on mixed data, FSDP2
  # with checkpoints) side by side on 2 GPUs each, then ZeRO-3 on all 4.
  nvidia-smi -L 2>/dev/null
  if [ -f .scaleout/mixed.parquet ]; then cp .scaleout/mixed.parquet /tmp/mixed.parquet  # made beforehand, carried
  else python3 benchmarks/make_mixed_data.py /tmp/mixed.parquet --samples ${SAMPLES:-1500} > /dev/null; fi
  LIMIT=${LIMIT:-110}
  { args deepspeed_zero3_x2; run deepspeed_zero3_x2 deepspeed_zero3 0,1 "${A[@]}"; } &
  { args fsdp2_x2; run fsdp2_x2 fsdp2 2,3 "${A[@]}"; } &
  wait
  python3 benchmarks/scaleout_report.py correctness "$RUNS" "$OUT" > /dev/null  # a partial verdict survives a cut
  tar -czf "$OUT/logs_quick.tar.gz" -C "$RUNS" logs
  if [ $SECONDS -lt ${ROUND2_BEFORE:-150} ]; then
    args deepspeed_zero3_x4; run deepspeed_zero3_x4 deepspeed_zero3 0,1,2,3 "${A[@]}"
  fi
  phase=correctness
  ;;
resume)
  four=0,1,2,3; [ "$DRY" = 1 ] && four=0,1,2
  n4=x4; [ "$DRY" = 1 ] && n4=x3
  # Same world size: kill after step-20 (SIGKILL, mid-run), resume; the reference is the correctness run.
  same=${BACKENDS[1]:-ddp}; rm -rf "$RUNS/${same}_killed"
  args "${same}_killed"; kill_after_checkpoint "${same}_killed" 20 "$same" 0,1 "${A[@]}"
  run "${same}_killed" "$same" 0,1 "${A[@]}" --resume_from_checkpoint latest
  # Another world size: resume the correctness runs' step-20 on the other count.
  for backend in "${BACKENDS[@]}"; do
    case $backend in deepspeed_zero2) continue ;; esac
    for move in "x2:$four:${n4}" "$n4:0,1:x2"; do
      from=${move%%:*}; rest=${move#*:}; gpus=${rest%%:*}; to=${rest#*:}
      name=${backend}_${from}_to_${to}; rm -rf "$RUNS/$name"; mkdir -p "$RUNS/$name/checkpoints"
      [ -d "$RUNS/${backend}_${from}/checkpoints/step-20" ] || { echo "$name: no step-20 to resume"; continue; }
      cp -r "$RUNS/${backend}_${from}/checkpoints/step-20" "$RUNS/$name/checkpoints/"
      head -n 20 "$RUNS/${backend}_${from}/steps.jsonl" > "$RUNS/$name/steps.jsonl"
      args "$name"; run "$name" "$backend" "$gpus" "${A[@]}" --resume_from_checkpoint latest
      [ "$backend" = deepspeed_zero3 ] && break  # the refusal needs showing once
    done
  done
  # Two "nodes" of one GPU each on this host, with a checkpoint, a kill and a resume.
  if [ "$DRY" != 1 ]; then
    node() {  # RANK NAME ARGS...: one "node" of the two, in its own process group; sets PID
      local rank=$1 name=$2; shift 2
      CUDA_VISIBLE_DEVICES=$rank setsid accelerate launch --config_file examples/accelerate/fsdp2.yaml \
        --num_machines 2 --machine_rank "$rank" --num_processes 2 --main_process_ip 127.0.0.1 \
        --main_process_port 29800 examples/train.py "$@" > "$LOGS/${name}_node$rank.log" 2>&1 &
      PID=$!
    }
    both_nodes() {  # LABEL ARGS...: both nodes, waited for (at most 300 s)
      local label=$1; shift
      node 0 two_nodes "$@"; local p0=$PID; node 1 two_nodes "$@"; local p1=$PID
      local waited=0
      while { kill -0 $p0 || kill -0 $p1; } 2>/dev/null && [ $waited -lt 300 ]; do sleep 1; waited=$((waited+1)); done
      kill -9 -- -$p0 -$p1 2>/dev/null; wait $p0; local rc0=$?; wait $p1; local rc1=$?
      for r in 0 1; do echo "EXIT $([ $r = 0 ] && echo $rc0 || echo $rc1) after ${waited}s" >> "$LOGS/two_nodes_node$r.log"
        mv "$LOGS/two_nodes_node$r.log" "$LOGS/two_nodes_${label}_node$r.log"; done
      echo "two_nodes $label: exit $rc0/$rc1 after ${waited}s"
    }
    args two_nodes; rm -rf "$RUNS/two_nodes"
    both_nodes first "${A[@]}" --max_steps 20
    both_nodes resumed "${A[@]}" --resume_from_checkpoint latest
  fi
  ;;
speed)
  nvidia-smi -L 2>/dev/null
  python3 benchmarks/make_image_data.py /tmp/images --samples ${SAMPLES:-6000} > /dev/null
  IMAGES=(--config examples/configs/bench_1b_images.yaml --dataset parquet --data_files "/tmp/images/images-*.parquet"
          --max_steps ${STEPS:-60} --checkpoint_every 0 --report_to none)
  LIMIT=420
  run speed_fsdp2_x1 fsdp2 0 "${IMAGES[@]}" --output_dir "$RUNS/speed_fsdp2_x1" &
  run speed_fsdp2_x2 fsdp2 1,2 "${IMAGES[@]}" --output_dir "$RUNS/speed_fsdp2_x2" &
  wait
  run speed_fsdp2_x4 fsdp2 0,1,2,3 "${IMAGES[@]}" --output_dir "$RUNS/speed_fsdp2_x4"
  run speed_zero3_x4 deepspeed_zero3 0,1,2,3 "${IMAGES[@]}" --output_dir "$RUNS/speed_zero3_x4"
  run speed_8b_fsdp2_x4 fsdp2 0,1,2,3 --config examples/configs/llama3_1_8b_siglip2_so400m.yaml --dataset parquet \
    --data_files "/tmp/images/images-*.parquet" --max_steps ${STEPS_8B:-25} --checkpoint_every 0 --report_to none \
    --output_dir "$RUNS/speed_8b_fsdp2_x4"
  ;;
esac
python3 benchmarks/scaleout_report.py "$phase" "$RUNS" "$OUT"
tar -czf "$OUT/logs_$phase.tar.gz" -C "$RUNS" logs $(cd "$RUNS" && ls -d */steps.jsonl */report.json 2>/dev/null)
