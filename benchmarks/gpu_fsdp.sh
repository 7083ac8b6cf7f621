#!/usr/bin/env bash
# Issue-3 benchmark on a GPU machine: recipe (FSDP2, sharded 4-bit) vs HF Trainer FSDP2, one call.
#
#   STAGES="ckpt r2 r1 hf2 off2" STEPS=60 bash benchmarks/gpu_fsdp.sh OUTDIR
#
# Stages: debug (tiny model smoke test, 2 GPUs), ckpt (write the 8B-shaped nf4 checkpoint),
# r1/r2/r4 (recipe on 1/2/4 GPUs), off2 (recipe, 2 GPUs, CPU offload), hf1/hf2/hf4 (HF baseline),
# det / det64 (1 GPU beside 2 GPUs, deterministic kernels; det64 adds fp64 gradient accumulation:
# needs 3 GPUs), vp2 (2 GPUs, vocabulary-sharded embedding), ckmem (checkpoint save/resume beside the memory profile: 4 GPUs), prof2, ck2, mem2.
# Every run writes OUTDIR/NAME.log and a JSON summary; the report table is printed at the end.
set -u
OUT=${1:-/tmp/bench}
mkdir -p "$OUT"
CK=${CK:-/tmp/ck_llama3_1_8b_nf4}
STEPS=${STEPS:-60}
HF_STEPS=${HF_STEPS:-8}
OFF_STEPS=${OFF_STEPS:-8}
TMO=${TMO:-420}
PY=${PY:-python3}
CFG=train_configs/llama3_8b_qlora.toml
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"

recipe() {  # name ngpu overrides...
  local name=$1 n=$2; shift 2
  local t0=$SECONDS
  timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m recipe.train \
    --job.config_file $CFG --model.checkpoint=$CK --job.dump_folder="$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t0))s | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  grep -E "Error|error:" "$OUT/$name.log" | grep -v "^\[rank1\]" | tail -5
}
hf() {  # name ngpu
  local name=$1 n=$2 t0=$SECONDS
  timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/hf_trainer_fsdp.py \
    --checkpoint $CK --out "$OUT/$name.json" --steps "$HF_STEPS" >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t0))s"
  grep -E "Error|error:" "$OUT/$name.log" | tail -5
}

for st in ${STAGES:-ckpt r2 r1 hf2}; do
  case $st in
    debug) timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m recipe.train \
             --job.config_file train_configs/debug_model.toml --training.mixed_precision_param=bfloat16 \
             --job.dump_folder="$OUT/debug" --model.checkpoint=/tmp/ck_debug >"$OUT/debug.log" 2>&1
           echo "[debug] rc=$? | $(grep -E '^step' "$OUT/debug.log" | tail -1)"; grep -E "Error" "$OUT/debug.log" | tail -5 ;;
    ckpt) t0=$SECONDS; [ -f $CK/config.json ] || $PY -m models.synthetic --shape llama3_1_8b --out $CK --device cuda 2>&1 | tail -2
          echo "[ckpt] $((SECONDS - t0))s $(du -sh $CK | cut -f1)" ;;
    r1) CUDA_VISIBLE_DEVICES=0 recipe r1 1 --training.steps=$STEPS ${R_EXTRA:-} ;;
    r2) recipe r2 2 --training.steps=$STEPS ${R_EXTRA:-} ;;
    r4) recipe r4 4 --training.steps=$STEPS ${R_EXTRA:-} ;;
    prof2) timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/profile_step.py \
             --job.config_file $CFG --model.checkpoint=$CK --job.dump_folder="$OUT/prof2" --checkpoint.export_adapter=false \
             >"$OUT/prof2.log" 2>&1; echo "[prof2] rc=$?"; grep -v "^\[rank1\]" "$OUT/prof2.log" | grep -A30 "profiled step" ;;
    ck2) t0=$SECONDS
         recipe ck2 2 --training.steps=6 --checkpoint.enable --checkpoint.interval=3 --checkpoint.export_adapter=false
         recipe ck2 2 --training.steps=8 --checkpoint.enable --checkpoint.interval=3 --checkpoint.export_adapter=false
         grep -hE "checkpoint|resum" "$OUT/ck2.log" | grep -v "^\[rank1\]" | tail -8
         du -sh "$OUT"/ck2/checkpoint/* 2>/dev/null ;;
    mem2) timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m recipe.train \
             --job.config_file train_configs/llama3_8b_memory_profile.toml --model.checkpoint=$CK \
             --job.dump_folder="$OUT/mem2" >"$OUT/mem2.log" 2>&1; echo "[mem2] rc=$?"
          grep -v "^\[rank1\]" "$OUT/mem2.log" | grep -A12 "memory report" | head -14 ;;
    det) # 1 GPU and 2 GPUs side by side (GPU 0 | GPUs 1,2), deterministic kernels: the loss comparison.
         (CUDA_VISIBLE_DEVICES=0 recipe det1 1 --training.steps=$STEPS --job.deterministic) &
         (CUDA_VISIBLE_DEVICES=1,2 recipe det2 2 --training.steps=$STEPS --job.deterministic) &
         wait ;;
    det64) # as det, with fp64 gradient accumulation: gradients bit-identical on 1 and 2 GPUs
         (CUDA_VISIBLE_DEVICES=0 recipe det64_1 1 --training.steps=$STEPS --job.deterministic --training.mixed_precision_reduce=float64) &
         (CUDA_VISIBLE_DEVICES=1,2 recipe det64_2 2 --training.steps=$STEPS --job.deterministic --training.mixed_precision_reduce=float64) &
         wait ;;
    ckmem) # checkpoint save/resume (GPUs 0,1) next to the memory-profile run (GPUs 2,3)
         (CUDA_VISIBLE_DEVICES=2,3 STAGES=mem2 bash "$0" "$OUT" >"$OUT/mem2.out" 2>&1) &
         CUDA_VISIBLE_DEVICES=0,1 STAGES=ck2 bash "$0" "$OUT" 2>&1 | grep -v "^|" | tail -12
         wait; grep -v "^|" "$OUT/mem2.out" | tail -14 ;;
    vp2) recipe vp2 2 --training.steps=$STEPS --parallelism.vocab_parallel_embedding ;;
    off2) recipe off2 2 --training.steps=$OFF_STEPS --parallelism.cpu_offload ;;
    hf1) CUDA_VISIBLE_DEVICES=0 hf hf1 1 ;;
    hf2) hf hf2 2 ;;
    hf4) hf hf4 4 ;;
  esac
done

args=()
# Side-by-side runs (det, det64) have their own names: a later r1/r2 stage must not replace them.
for n in r1 r2 r4 vp2 off2 det1 det2 det64_1 det64_2; do [ -f "$OUT/$n/summary.json" ] && args+=("$n=$OUT/$n/summary.json"); done
hargs=()
for n in hf1 hf2 hf4; do [ -f "$OUT/$n.json" ] && hargs+=("$n=$OUT/$n.json"); done
cmp=()
for pair in "r1 r2" "det1 det2" "det64_1 det64_2"; do
  set -- $pair
  [ -f "$OUT/$1/summary.json" ] && [ -f "$OUT/$2/summary.json" ] && cmp+=(--compare "$1" "$2")
done
$PY benchmarks/report.py --recipe "${args[@]}" --hf "${hargs[@]}" "${cmp[@]}"
