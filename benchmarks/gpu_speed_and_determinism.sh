#!/usr/bin/env bash
# One-GPU call: 1-GPU tokens/s of this tree against an older tree (same call, same checkpoint), and the
# strict deterministic mode: 1 vs 2 vs 3 ranks on the one GPU (gloo, ../shared/gpu/one_gpu_ranks.py).
#
#   STAGES="ckpt speed det" OLD=.bench_old bash benchmarks/gpu_speed_and_determinism.sh OUTDIR
#
# speed: 8B shape (train_configs/llama3_8b_qlora.toml: seq 2048, micro-batch 2, global batch 8, full AC,
#        bf16), SPEED_STEPS steps each, old / new / old / new; tokens/s = median step after 3 warm-up steps.
# det:   1B shape, DET_STEPS steps, seq 512, global batch 6, --job.deterministic
#        --training.mixed_precision_reduce=float64: 1 rank (NCCL), 2 and 3 ranks (gloo, all on cuda:0);
#        losses and exported adapters compared bit for bit; 1 rank without the flag for its speed cost.
# OLD: a checkout of the older tree (e.g. `git archive <commit> | tar -x -C .bench_old`), carried along.
set -u
OUT=${1:-/tmp/gs}
mkdir -p "$OUT"
PY=${PY:-python3}
CK8=${CK8:-/tmp/ck_llama3_1_8b_nf4}
CK1=${CK1:-/tmp/ck_llama3_2_1b_nf4}
SPEED_STEPS=${SPEED_STEPS:-10}
DET_STEPS=${DET_STEPS:-20}
TMO=${TMO:-300}
CFG=train_configs/llama3_8b_qlora.toml
ROOT=$PWD
SITE=${SITE:-$PWD/.whl/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'bnb', bitsandbytes.__version__)"

run() {  # name tree nproc launcher-args... -- recipe overrides...
  local name=$1 tree=$2 n=$3; shift 3
  local t0=$SECONDS
  (cd "$tree" && PYTHONPATH="$SITE:$PWD" timeout "$TMO" $PY -m torch.distributed.run --standalone \
      --nproc_per_node "$n" "$@" --job.dump_folder="$OUT/$name" >"$OUT/$name.log" 2>&1)
  echo "[$name] rc=$? $((SECONDS - t0))s | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null  # the device copies back shallow files only
  grep -E "Error|error" "$OUT/$name.log" | grep -v "^\[rank[12]\]" | tail -4
}

for st in ${STAGES:-ckpt speed det}; do
  case $st in
    ckpt)
      t0=$SECONDS
      [ -f $CK8/config.json ] || PYTHONPATH="$SITE:$ROOT" $PY -m models.synthetic --shape llama3_1_8b --out $CK8 --device cuda | tail -1
      [ -f $CK1/config.json ] || PYTHONPATH="$SITE:$ROOT" $PY -m models.synthetic --shape llama3_2_1b --out $CK1 --device cuda | tail -1
      echo "[ckpt] $((SECONDS - t0))s" ;;
    speed)
      common=(--job.config_file $CFG --model.checkpoint=$CK8 --model.synthetic_shape= --training.steps=$SPEED_STEPS
              --metrics.log_freq=1 --checkpoint.export_adapter=false)
      for i in $(seq "${SPEED_PAIRS:-2}"); do
        run "old$i" "${OLD:-.bench_old}" 1 -m recipe.train "${common[@]}"
        run "new$i" "$ROOT" 1 -m recipe.train "${common[@]}"
      done ;;
    det)
      det=(--job.config_file $CFG --model.checkpoint=$CK1 --model.synthetic_shape= --data.seq_len=512
           --training.micro_batch_size=1 --training.global_batch_size=6 --training.steps=$DET_STEPS
           --training.mixed_precision_reduce=float64 --metrics.log_freq=1 --lr_scheduler.warmup_steps=2)
      run det_plain1 "$ROOT" 1 -m recipe.train "${det[@]}"
      run det1 "$ROOT" 1 -m recipe.train "${det[@]}" --job.deterministic
      run det2 "$ROOT" 2 .whl/tools/one_gpu_ranks.py -m recipe.train "${det[@]}" --job.deterministic --parallelism.backend=gloo
      run det3 "$ROOT" 3 .whl/tools/one_gpu_ranks.py -m recipe.train "${det[@]}" --job.deterministic --parallelism.backend=gloo
      ;;
  esac
done
PYTHONPATH="$SITE:$ROOT" $PY "$ROOT/benchmarks/compare_runs.py" "$OUT"
