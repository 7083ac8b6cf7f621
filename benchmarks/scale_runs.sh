#!/usr/bin/env bash
# Issue 24, points 1 and 2, on ONE GPU (H100 80GB), in stages that each fit one 10-minute command; one
# table per stage (benchmarks/scale_report.py: measured peaks, host, tokens/s and losses beside the
# estimate). Checkpoints live in /tmp of the warm machine: run the stages on the same warm machine (a fresh
# one writes them again: ckpt70 / ckpt8).
#
#   export PYTHONPATH=$PWD/.whl/site:$PWD                       # with carry: [".whl"]
#   STAGES="predict ckpt70" bash benchmarks/scale_runs.sh $OUT/s  # the estimates, then the 70B checkpoint once (~39 GB)
#   STAGES="r70_24" bash benchmarks/scale_runs.sh $OUT/s          # 70B, 2 gloo ranks on the GPU, each capped at 24 GiB
#   STAGES="r70_15" bash benchmarks/scale_runs.sh $OUT/s          # the same at 15 GiB
#   STAGES="ckpt8 l80" LENS="131072 196608" bash benchmarks/scale_runs.sh $OUT/s   # 8B long context, whole GPU
#   STAGES="l24" LENS="65536 98304 131072" bash benchmarks/scale_runs.sh $OUT/s     # 8B long context, 24 GiB cap
#   ATTN=cudnn STAGES="l80" LENS="131072" bash benchmarks/scale_runs.sh $OUT/s      # 8B long context, cuDNN attention forced
#   STAGES=report bash benchmarks/scale_runs.sh $OUT/s            # every run so far, one table
#
# 70B (train_configs/llama3_70b_qlora_2gpu.toml): seq 2048, micro-batch 1, global batch 2, 2 optimizer steps,
# CPU offload, full AC, gloo (NCCL refuses two ranks on one GPU; speed through gloo means nothing), a
# training checkpoint and the adapter saved at the last step. Its rows: load / train peak per rank (no rank
# may hold the whole 4-bit model: ~37 GiB), host peak per rank, loss finite. STEPS70 / TMO override.
# Long context (8B, micro-batch 1, --model.mlp_chunk_tokens=8192, activation offload, host embedding, full AC:
# the settings of the 32k / 64k rows of REFERENCE.md 0): each length in LENS for STEPS_LONG steps (2: the
# second is timed), one run per length; a length that runs out of memory shows as FAILED with the error.
# EXTRA adds overrides to every run (a CPU smoke test: EXTRA="--model.synthetic_shape=debug --training.device=cpu
# --model.mlp_chunk_tokens=64" CK8=/tmp/ck_debug LENS=256 STAGES=l80 RANKS=../shared/gpu/one_gpu_ranks.py).
# `predict` prints the estimator's longest seq_len under 80 and 24 GiB first: start LENS there.
set -u
OUT=${1:-/tmp/scale}
mkdir -p "$OUT"
PY=${PY:-python3}
CK70=${CK70:-/tmp/ck_llama3_1_70b_nf4}
CK8=${CK8:-/tmp/ck_llama3_1_8b_nf4}
TMO=${TMO:-560}
STEPS70=${STEPS70:-2}
STEPS_LONG=${STEPS_LONG:-2}
LENS=${LENS:-"131072 196608 262144"}
RANKS=${RANKS:-${ONE_GPU_RANKS:-.whl/tools/one_gpu_ranks.py}}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
LONG=(--job.config_file train_configs/llama3_8b_qlora.toml --model.checkpoint="$CK8" --model.synthetic_shape=llama3_1_8b
      --training.micro_batch_size=1 --training.global_batch_size=1 --model.mlp_chunk_tokens=8192
      --activation_checkpoint.mode=full --activation_checkpoint.offload=true --parallelism.host_embedding=true
      --data.num_synthetic_samples=8)
# ATTN=cudnn (or flash, efficient): the long-context runs with that SDPA kernel forced (training.attention_backend),
# named l80_<len>_<kernel>; unset: torch's choice.
ATTN=${ATTN:-}
ATTN_ARG=() ATTN_TAG=""
[ -n "$ATTN" ] && ATTN_ARG=(--training.attention_backend="$ATTN") ATTN_TAG="_$ATTN"
# 70B saves at its last step (a sharded training checkpoint, then the PEFT adapter): the save's peaks count too.
R70=(--job.config_file train_configs/llama3_70b_qlora_2gpu.toml --model.checkpoint="$CK70" --data.seq_len=2048
     --training.micro_batch_size=1 --training.global_batch_size=2 --checkpoint.enable=true
     --checkpoint.interval="$STEPS70" --checkpoint.export_adapter=true)

run() {  # name nproc cap(GiB, "" = none) recipe.train args...
  local name=$1 n=$2 cap=$3; shift 3
  local args=(--checkpoint.export_adapter=false "$@" --job.dump_folder="$OUT/$name" --metrics.log_freq=1 ${EXTRA:-})
  [ "$n" -gt 1 ] && args+=(--parallelism.backend=gloo)
  printf '%s\n' "$n" "${cap:--}" "${args[@]}" >"$OUT/$name.args"
  local t0=$SECONDS
  GPU_MEM_CAP_GIB=$cap timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" "$RANKS" \
    -m recipe.train "${args[@]}" >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t0))s | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null  # the device copies back shallow files only
  grep -E "Error|error:" "$OUT/$name.log" | grep -v "^\[rank[1-9]\]" | tail -3
  $PY benchmarks/scale_report.py "$OUT" "$name"
}

for st in ${STAGES:-predict}; do
  case $st in
    predict)
      $PY -m recipe.estimate "${R70[@]}" --ngpu 2 --card l4 | grep -E "peak|host"
      for g in 80 24; do
        $PY -m recipe.estimate "${LONG[@]}" --data.seq_len=65536 --card h100 --fit-gpu-gib "$g" | grep "fits under"
      done ;;
    ckpt70) t0=$SECONDS
      [ -f "$CK70/config.json" ] || $PY -m models.synthetic --shape llama3_1_70b --out "$CK70" --device cuda | tail -1
      echo "[ckpt70] $((SECONDS - t0))s $(du -sh "$CK70" | cut -f1)" ;;
    ckpt8) [ -f "$CK8/config.json" ] || $PY -m models.synthetic --shape llama3_1_8b --out "$CK8" --device cuda | tail -1 ;;
    r70_24) run r70_24 2 24 "${R70[@]}" --training.steps="$STEPS70" ;;
    r70_15) run r70_15 2 15 "${R70[@]}" --training.steps="$STEPS70" ;;
    l80) for L in $LENS; do run "l80_$L$ATTN_TAG" 1 "" "${LONG[@]}" "${ATTN_ARG[@]}" --data.seq_len="$L" --training.steps="$STEPS_LONG"; done ;;
    l24) for L in $LENS; do run "l24_$L$ATTN_TAG" 1 24 "${LONG[@]}" "${ATTN_ARG[@]}" --data.seq_len="$L" --training.steps="$STEPS_LONG"; done ;;
    report) $PY benchmarks/scale_report.py "$OUT" $(cd "$OUT" && ls *.args 2>/dev/null | sed 's/\.args$//') ;;
    *) echo "unknown stage $st" ;;
  esac
done
