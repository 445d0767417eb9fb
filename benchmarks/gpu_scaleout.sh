#!/usr/bin/env bash
# The scale-out checks, on one machine of 4 GPUs (nvidia-h100-x4 or nvidia-h200-x4), in two calls of the device tool:
#
#   bash benchmarks/gpu_scaleout.sh check   # DDP, FSDP2, ZeRO-2, ZeRO-3 on 4 GPUs (and DDP on 2), mixed data, 30 steps;
#                                           # SIGKILL + exact resume; 4 -> 2 and 2 -> 4; ZeRO refusal; two nodes
#   bash benchmarks/gpu_scaleout.sh speed   # tokens/s per GPU on 1, 2 and 4 GPUs (FSDP2), ZeRO-3 and DDP on 4,
#                                           # loader headroom, then the 8B config on 4 (SPEED_JOBS narrows the
#                                           # jobs, "none" runs none; SKIP_EXTRAS=1 skips the loader and the 8B,
#                                           # SKIP_LOADER=1 the loader only; ARGS_8B adds to the 8B; SPEED_ARGS adds
#                                           # train.py arguments to every job, e.g. "--profile_steps 5"; a job
#                                           # may carry a label and arguments of its own)
#
# `check` is about correctness, not speed, so its jobs share the GPUs: every job of a wave starts at once (a 4-GPU
# job and a 2-GPU job on the same cards is fine for a 100M model), which makes the phase minutes instead of a
# quarter hour. `speed` runs one job at a time, alone on its GPUs.
# Each run's log goes into $OUT/logs_<phase>.tar.gz; $OUT/<phase>.json and .md hold the verdicts
# (benchmarks/scaleout_report.py). CPU rehearsal of the orchestration (torchrun, gloo, tiny model, DDP only):
#   DRY=1 bash benchmarks/gpu_scaleout.sh check
# NVLink multicast stays off (gpu_env.sh). Runs are stopped by process group, never by name.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/scaleout_out}; RUNS=${RUNS:-/tmp/runs}; LOGS=$RUNS/logs
mkdir -p "$OUT" "$RUNS" "$LOGS"
phase=${1:?check or speed}
DRY=${DRY:-0}

if [ "$DRY" = 1 ]; then
  BACKENDS=(ddp); SAME=ddp; FOUR=0,1,2; N4=x3
  MODEL=(--config "" --text_hidden_size 64 --text_intermediate_size 128 --text_heads 2 --text_kv_heads 1
    --vision_hidden_size 32 --vision_intermediate_size 64 --vision_heads 2 --text_layers 2 --vision_layers 1
    --patch_size 8 --spatial_merge_size 2 --min_patches 4 --max_patches 64 --vocab_size 320
    --learning_rate 0.002 --warmup_steps 3 --eval_samples 0 --eval_before false --report_to none)
  SEQ=(--seq_len 512 --rows_per_batch 1)
else
  BACKENDS=(ddp fsdp2 deepspeed_zero2 deepspeed_zero3); SAME=fsdp2; FOUR=0,1,2,3; N4=x4
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

# args NAME: the arguments every run of the check phase shares, into the array A.
args() {
  A=("${MODEL[@]}" "${SEQ[@]}" "${MIXED[@]}" --max_steps 30 --checkpoint_every 10 --keep_checkpoints 3
     --check_final_reload true --output_dir "$RUNS/$1" --log_sample_ids true)
}

# resume_on NAME FROM BACKEND GPUS: a copy of run FROM's step-20 (and its first 20 steps.jsonl lines), resumed on GPUS.
resume_on() {
  local name=$1 from=$2 backend=$3 gpus=$4
  rm -rf "$RUNS/$name"; mkdir -p "$RUNS/$name/checkpoints"
  [ -d "$RUNS/$from/checkpoints/step-20" ] || { echo "$name: no step-20 in $from to resume"; return; }
  cp -r "$RUNS/$from/checkpoints/step-20" "$RUNS/$name/checkpoints/"
  head -n 20 "$RUNS/$from/steps.jsonl" > "$RUNS/$name/steps.jsonl"
  args "$name"; run "$name" "$backend" "$gpus" "${A[@]}" --resume_from_checkpoint latest
}

# Two "nodes" of one GPU each on this host: accelerate launch --num_machines 2, one process group per node.
node() {  # RANK NAME ARGS...: sets PID
  local rank=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$rank setsid accelerate launch --config_file examples/accelerate/fsdp2.yaml \
    --num_machines 2 --machine_rank "$rank" --num_processes 2 --main_process_ip 127.0.0.1 \
    --main_process_port 29800 examples/train.py "$@" > "$LOGS/${name}_node$rank.log" 2>&1 &
  PID=$!
}
both_nodes() {  # LABEL ARGS...: both nodes, waited for (at most $LIMIT seconds)
  local label=$1; shift
  node 0 two_nodes "$@"; local p0=$PID; node 1 two_nodes "$@"; local p1=$PID
  local waited=0
  while { kill -0 $p0 || kill -0 $p1; } 2>/dev/null && [ $waited -lt "${LIMIT:-300}" ]; do sleep 1; waited=$((waited+1)); done
  kill -9 -- -$p0 -$p1 2>/dev/null; wait $p0; local rc0=$?; wait $p1; local rc1=$?
  for r in 0 1; do echo "EXIT $([ $r = 0 ] && echo $rc0 || echo $rc1) after ${waited}s" >> "$LOGS/two_nodes_node$r.log"
    mv "$LOGS/two_nodes_node$r.log" "$LOGS/two_nodes_${label}_node$r.log"; done
  echo "two_nodes $label: exit $rc0/$rc1 after ${waited}s"
}

finish() {  # PHASE: verdicts and logs into $OUT (also after a partial run)
  python3 benchmarks/scaleout_report.py "$1" "$RUNS" "$OUT"
  tar -czf "$OUT/logs_$1.tar.gz" -C "$RUNS" logs $(cd "$RUNS" && ls -d */steps.jsonl */report.json 2>/dev/null)
}

case $phase in
check)
  nvidia-smi -L 2>/dev/null
  if [ -f .scaleout/mixed.parquet ]; then cp .scaleout/mixed.parquet /tmp/mixed.parquet  # made beforehand, carried
  else python3 benchmarks/make_mixed_data.py /tmp/mixed.parquet --samples ${SAMPLES:-1500} > /dev/null; fi
  LIMIT=${LIMIT:-300}
  # Wave 1, all at once: every backend on 4 GPUs, DDP on 2 (for 2 -> 4), the run killed after step-20, two nodes.
  for backend in "${BACKENDS[@]}"; do args "${backend}_$N4"; run "${backend}_$N4" "$backend" $FOUR "${A[@]}" & done
  args ddp_x2; run ddp_x2 ddp 0,1 "${A[@]}" &
  rm -rf "$RUNS/${SAME}_${N4}_killed"; args "${SAME}_${N4}_killed"
  kill_after_checkpoint "${SAME}_${N4}_killed" 20 "$SAME" $FOUR "${A[@]}" &
  if [ "$DRY" != 1 ]; then args two_nodes; rm -rf "$RUNS/two_nodes"; both_nodes first "${A[@]}" --max_steps 20 & fi
  wait
  finish correctness
  # Wave 2, all at once: the killed run resumed; 4 -> 2 (DDP, FSDP2, ZeRO-3's refusal); 2 -> 4 (DDP); two nodes.
  args "${SAME}_${N4}_killed"; run "${SAME}_${N4}_killed" "$SAME" $FOUR "${A[@]}" --resume_from_checkpoint latest &
  i=0
  for backend in "${BACKENDS[@]}"; do
    [ "$backend" = deepspeed_zero2 ] && continue
    gpus=$([ $((i % 2)) = 0 ] && echo 0,1 || echo 2,3); i=$((i + 1))
    [ "$DRY" = 1 ] && gpus=0,1
    resume_on "${backend}_${N4}_to_x2" "${backend}_$N4" "$backend" "$gpus" &
  done
  resume_on "ddp_x2_to_$N4" ddp_x2 ddp $FOUR &
  if [ "$DRY" != 1 ]; then args two_nodes; both_nodes resumed "${A[@]}" --resume_from_checkpoint latest & fi
  wait
  phase=resume
  ;;
speed)
  nvidia-smi -L 2>/dev/null
  # A warm machine keeps /tmp between calls: the photos of an earlier call are reused.
  [ -f /tmp/images/.complete ] || { python3 benchmarks/make_image_data.py /tmp/images --samples ${SAMPLES:-4000} \
    > /dev/null && touch /tmp/images/.complete; }
  IMAGES=(--config examples/configs/bench_1b_images.yaml --dataset parquet --data_files "/tmp/images/images-*.parquet"
          --max_steps ${STEPS:-50} --checkpoint_every 0 --report_to none)
  LIMIT=${LIMIT:-150}
  # One job at a time, alone on its GPUs: per-GPU tokens/s on 1, 2 and 4 (FSDP2), then ZeRO-3 and DDP on 4.
  # SPEED_JOBS narrows the list (e.g. "fsdp2 0 x1;fsdp2 0,1 x2;fsdp2 0,1,2,3 x4" when device time is short).
  IFS=';' read -r -a JOBS <<<"${SPEED_JOBS:-fsdp2 0 x1;fsdp2 0,1 x2;fsdp2 0,1,2,3 x4;deepspeed_zero3 0,1,2,3 x4;ddp 0,1,2,3 x4}"
  [ "${SPEED_JOBS:-}" = none ] && JOBS=()  # e.g. the 8B config alone: SPEED_JOBS=none SKIP_LOADER=1
  # A job is "BACKEND GPUS xN [LABEL train.py arguments...]"; a labelled job is compared with FSDP2 on one GPU under
  # the same label (e.g. "fsdp2 0 x1 rows4 --rows_per_batch 4;fsdp2 0,1,2,3 x4 rows4 --rows_per_batch 4").
  for job in "${JOBS[@]}"; do
    set -- $job
    job_name="speed_${1}_$3${4:+_$4}"; backend=$1; gpus=$2; shift $(( $# < 4 ? $# : 4 ))
    run "$job_name" "$backend" "$gpus" "${IMAGES[@]}" --output_dir "$RUNS/$job_name" ${SPEED_ARGS:-} "$@"
    finish speed  # after every job: a device call that runs out of time still brings back the jobs it finished
  done
  [ "${SKIP_EXTRAS:-0}" = 1 ] && { finish speed; exit 0; }
  # The loader alone (batches per second with the configs' worker count), beside the steps per second above.
  [ "${SKIP_LOADER:-0}" = 1 ] || timeout 90 python3 benchmarks/bench_loader.py --config examples/configs/bench_1b_images.yaml \
    --data_files "/tmp/images/images-*.parquet" --workers 2 8 --repeats 1 > "$LOGS/loader_headroom.log" 2>&1
  finish speed
  # The 8B config (Llama-3.1-8B + so400m dimensions) on 4 GPUs, with whatever time the call has left. ARGS_8B adds
  # train.py arguments, e.g. "--gradient_checkpointing true --rows_per_batch 2" (the second session's setting).
  LIMIT=${LIMIT_8B:-240} run speed_8b_fsdp2_x4 fsdp2_reshard 0,1,2,3 --config examples/configs/llama3_1_8b_siglip2_so400m.yaml \
    --dataset parquet --data_files "/tmp/images/images-*.parquet" --max_steps ${STEPS_8B:-25} --checkpoint_every 0 \
    --report_to none --output_dir "$RUNS/speed_8b_fsdp2_x4" ${ARGS_8B:-}
  ;;
*) echo "unknown phase $phase: check or speed"; exit 2 ;;
esac
finish "$phase"
