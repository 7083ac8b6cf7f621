#!/usr/bin/env bash
# One GPU, one call: this recipe (eager, compiled, with and without activation offload; optionally an
# older tree) beside the plain HF + peft + bitsandbytes loop, HF Trainer, the recipe's HF Trainer adapter
# and Unsloth, on the same 8B-shaped checkpoint; one table (benchmarks/single_gpu_report.py) + JSON.
#
#   bash ../shared/gpu/stage_wheels.sh --unsloth      # here, once; then on the GPU machine (carry .whl):
#   export PYTHONPATH=$PWD/.whl/site:$PWD; bash benchmarks/single_gpu.sh $OUT/b
#
# Workload (train_configs/llama3_8b_qlora.toml): LoRA r=64 alpha=128 on the seven projections, seq 2048,
# micro-batch 2, accumulation 4 (16,384 tokens per step), bf16, full activation checkpointing.
# RUNS picks and orders the runs (default below); each is one of
#   default                                          the config as a user runs it: compile, host embedding,
#                                                    lm_head on the host, activation offload and kept outputs
#                                                    (o/gate/up in every 2nd block) 'auto' (all on for one CUDA rank)
#   default_nokeep                                   default keeping nothing (the default before 2026-12-07, 7th session)
#   default_mb4                                      default at micro-batch 4 (accumulation 2: the same 16,384 tokens/step)
#   default_nosync                                   default without a host read per step (no non-finite check,
#                                                    metrics read once at the end): what the step-end sync costs
#   mem_default mem_mb4 mem_mb4_keep2                 3 steps of default (at micro-batch 4, keeping o/gate/up in every
#                                                    2nd block) with a memory snapshot of step 3: what is alive at
#                                                    the peak, by allocating frame (benchmarks/memory_at_peak.py)
#   default_fused default_mb4_fused                  default (at micro-batch 4) with --model.fuse_projections=true
#   default_keep default_keep2 default_keep_o        default keeping o/gate/up's frozen outputs (not recomputed; offloaded)
#                                                    in every block / every 2nd block, or o_proj's only
#   default_head default_head_mb4 default_head_keep2 default_head_mb4_keep2   with lm_head's matrix on the host
#   default_eager_loss compiled_loss                 default with --training.compile_loss=false (the loss chunks'
#                                                    cross-entropy eager, as before 2026-12-07) / compiled with it true
#   eager compiled eager_offload compiled_offload   this recipe (--training.compile / --activation_checkpoint.offload)
#   eager_lean compiled_lean                         the same with offload and --parallelism.host_embedding
#   fused_eager fused_compiled                       eager / compiled with --model.fuse_projections=true (q/k/v, gate/up fused)
#   compiled_host                                    compiled with --parallelism.host_embedding only
#   compiled_noac compiled_cg                        compiled without activation checkpointing, and the same with
#                                                    --training.compile_mode=reduce-overhead (CUDA graphs; with
#                                                    checkpointing it stopped the step: BENCHMARKS.md 2026-12-07)
#   eager_fsdp1 compiled_fsdp1                       eager / compiled with FSDP kept on the one rank
#                                                    (--parallelism.single_rank_fsdp=true; the default runs without FSDP)
#   old_eager old_compiled                           the same from the tree in $OLD (e.g. git archive <commit>)
#   old_default                                      default from the tree in $OLD (one that has the five 'auto'
#                                                    flags: 2026-12-07, seventh session, or later)
#   hf_loop hf_trainer adapter                       HF + peft + bnb plain loop / HF Trainer / recipe.hf_trainer
#   adapter2 recipe2 recipe2_lean                    2 ranks on the one GPU (gloo, 1 step; memory only, speed means nothing)
#   unsloth unsloth_mb4                              .whl/tools/unsloth/run.sh (stage_wheels.sh --unsloth), at the
#                                                    workload's micro-batch 2 x 4, or 4 x 2 (the same tokens per step)
#   profile profile_compiled profile_default         benchmarks/profile_step.py on the eager / compiled / default recipe (top kernels, GPU idle time and the host work it waits for)
#   host_cost                                        benchmarks/host_cost.py: host microseconds per 4-bit dequantization
#                                                    and per QLoRA projection call, by path
#   oracle (alias compile_check)                     benchmarks/oracle.py: first-step LoRA gradients and 20 steps
#                                                    of losses of each fast path against fp32 eager (accumulation 1);
#                                                    OVARIANTS=a,b,... picks them (e.g. bf16_eager,bf16_compiled_loss)
# A recipe run's name may end in +section.key=value overrides: `default_mb4+model.lora_epilogue=false`.
# EXTRA: more overrides for every recipe run (e.g. --metrics.memory_report=true).
# COPY_TO: a folder (e.g. the device's $OUT) that gets each run's summary JSON as soon as that run ends, so
# a call stopped by its time limit (or a machine taken back) still returns the runs that finished.
# STEPS optimizer steps per run (tokens/s: median after 3 warm-up steps), TMO seconds per run (OTMO for oracle,
# default 420).
set -u
OUT=${1:-/tmp/single_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
CK=${CK:-/tmp/ck_llama3_1_8b_nf4}
STEPS=${STEPS:-8}
TMO=${TMO:-240}
OLD=${OLD:-.bench_old}
RUNS=${RUNS:-"eager compiled compiled_offload eager_offload hf_loop unsloth"}
ROOT=$PWD
SITE=${SITE:-$PWD/.whl/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
t0=$SECONDS
[ -f "$CK/config.json" ] || PYTHONPATH="$SITE:$ROOT" $PY -m models.synthetic --shape llama3_1_8b --out "$CK" --device cuda | tail -1
echo "[ckpt] $((SECONDS - t0))s"

# compile (blocks and loss) off and the three memory savers off: every named run is the layout its name
# says, now that these five default to 'auto' (on for one CUDA rank); the runs override what they measure
# (the last override wins); `default` puts all five back to 'auto'.
common=(--job.config_file train_configs/llama3_8b_qlora.toml --model.checkpoint="$CK" --model.synthetic_shape=
        --training.steps="$STEPS" --metrics.log_freq=1 --checkpoint.export_adapter=false --training.compile=false
        --training.compile_loss=false
        --parallelism.host_embedding=false --parallelism.host_lm_head=false --activation_checkpoint.offload=false
        --activation_checkpoint.keep_outputs= ${EXTRA:-})
auto=(--training.compile=auto --training.compile_loss=auto --parallelism.host_embedding=auto
      --parallelism.host_lm_head=auto --activation_checkpoint.offload=auto --activation_checkpoint.keep_outputs=auto)
old_common=()  # the tree in $OLD (git archive 72f1883) predates training.compile_loss (its loss is eager),
for a in "${common[@]}"; do  # parallelism.host_lm_head (its lm_head is on the GPU) and keep_outputs
  [[ $a == --training.compile_loss=* || $a == --parallelism.host_lm_head=* || $a == --activation_checkpoint.keep_outputs=* ]] \
    || old_common+=("$a")
done
keep() { [ -n "${COPY_TO:-}" ] && [ -f "$1" ] && mkdir -p "$COPY_TO" && cp "$1" "$COPY_TO/"; return 0; }
recipe() {  # name tree nproc launcher... -- overrides
  local name=$1$suffix tree=$2 n=$3; shift 3
  local t=$SECONDS
  (cd "$tree" && PYTHONPATH="$SITE:$PWD" timeout "$TMO" $PY -m torch.distributed.run --standalone \
      --nproc_per_node "$n" "$@" "${more[@]}" --job.dump_folder="$OUT/$name" >"$OUT/$name.log" 2>&1)
  echo "[$name] rc=$? $((SECONDS - t))s | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null  # the device copies back shallow files only
  keep "$OUT/$name.summary.json"
  grep -E "Error|error:" "$OUT/$name.log" | grep -v "^\[rank[1-9]\]" | tail -4
}
script() {  # name nproc script args...
  local name=$1 n=$2; shift 2
  local t=$SECONDS
  PYTHONPATH="$SITE:$ROOT" timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" "$@" \
      >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t))s"
  keep "$OUT/$name.json"
  grep -E "Error|error:" "$OUT/$name.log" | grep -v "^\[rank[1-9]\]" | tail -4
}
two=(.whl/tools/one_gpu_ranks.py -m recipe.train)
lean=(--activation_checkpoint.offload=true --parallelism.host_embedding=true)
fused=(--model.fuse_projections=true)
keep=(--activation_checkpoint.keep_outputs=o_proj,gate_proj,up_proj)
head=(--parallelism.host_lm_head=true)
hfargs=(--checkpoint "$CK" --steps "$STEPS")
# A memory snapshot of step 3 and what is alive at its peak (benchmarks/memory_at_peak.py), in $OUT/<name>.peak.txt.
snap=(--training.steps=3 --profiling.enable_memory_snapshot=true --profiling.memory_snapshot_steps=3)
peak() {  # name
  PYTHONPATH="$SITE:$ROOT" $PY benchmarks/memory_at_peak.py "$OUT/$1/profiling/memory_snapshot/rank0_step3.pickle" \
      >"$OUT/$1.peak.txt" 2>&1
  echo "graph breaks logged: $(grep -c 'Graph break' "$OUT/$1.log")" >>"$OUT/$1.peak.txt"
  grep -A2 'Graph break' "$OUT/$1.log" | head -12 >>"$OUT/$1.peak.txt"
  echo "[$1] memory at the peak:"; head -45 "$OUT/$1.peak.txt"; keep "$OUT/$1.peak.txt"
}
for r in $RUNS; do
  # A run name may end in +section.key=value overrides (e.g. default_mb4+model.lora_epilogue=false): the
  # named run with them; its files are named after the whole, with + = . , as _.
  more=(); suffix=""
  if [[ $r == *+* ]]; then
    IFS='+' read -ra kv <<<"${r#*+}"
    for x in "${kv[@]}"; do more+=("--$x"); done
    suffix=$(printf '%s' "+${r#*+}" | tr '+=.,' '____')
    r=${r%%+*}
  fi
  case $r in
    default) recipe default "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" ;;
    default_nokeep) recipe default_nokeep "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" \
        --activation_checkpoint.keep_outputs= ;;
    default_mb4) recipe default_mb4 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" --training.micro_batch_size=4 ;;
    default_nosync) recipe default_nosync "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" \
        --training.max_nonfinite_steps=0 --metrics.log_freq="$STEPS" ;;
    mem_default) TORCH_LOGS=graph_breaks recipe mem_default "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${snap[@]}"; peak "mem_default$suffix" ;;
    mem_mb4) TORCH_LOGS=graph_breaks recipe mem_mb4 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" --training.micro_batch_size=4 \
        "${snap[@]}"; peak "mem_mb4$suffix" ;;
    mem_mb4_keep2) TORCH_LOGS=graph_breaks recipe mem_mb4_keep2 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${keep[@]}" \
        --activation_checkpoint.keep_every=2 --training.micro_batch_size=4 "${snap[@]}"; peak "mem_mb4_keep2$suffix" ;;
    default_fused) recipe default_fused "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${fused[@]}" ;;
    default_mb4_fused) recipe default_mb4_fused "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${fused[@]}" \
        --training.micro_batch_size=4 ;;
    default_keep) recipe default_keep "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${keep[@]}" ;;
    default_keep2) recipe default_keep2 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${keep[@]}" \
        --activation_checkpoint.keep_every=2 ;;
    default_keep_o) recipe default_keep_o "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" \
        --activation_checkpoint.keep_outputs=o_proj ;;
    default_head) recipe default_head "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${head[@]}" ;;
    default_head_mb4) recipe default_head_mb4 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${head[@]}" \
        --training.micro_batch_size=4 ;;
    default_head_keep2) recipe default_head_keep2 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" "${head[@]}" \
        "${keep[@]}" --activation_checkpoint.keep_every=2 ;;
    default_head_mb4_keep2) recipe default_head_mb4_keep2 "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" \
        "${head[@]}" "${keep[@]}" --activation_checkpoint.keep_every=2 --training.micro_batch_size=4 ;;
    default_eager_loss) recipe default_eager_loss "$ROOT" 1 -m recipe.train "${common[@]}" "${auto[@]}" \
        --training.compile_loss=false ;;
    compiled_loss) recipe compiled_loss "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --training.compile_loss=true ;;
    eager) recipe eager "$ROOT" 1 -m recipe.train "${common[@]}" ;;
    compiled) recipe compiled "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true ;;
    eager_offload) recipe eager_offload "$ROOT" 1 -m recipe.train "${common[@]}" --activation_checkpoint.offload=true ;;
    compiled_offload) recipe compiled_offload "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --activation_checkpoint.offload=true ;;
    eager_lean) recipe eager_lean "$ROOT" 1 -m recipe.train "${common[@]}" "${lean[@]}" ;;
    fused_eager) recipe fused_eager "$ROOT" 1 -m recipe.train "${common[@]}" "${fused[@]}" ;;
    fused_compiled) recipe fused_compiled "$ROOT" 1 -m recipe.train "${common[@]}" "${fused[@]}" --training.compile=true ;;
    compiled_host) recipe compiled_host "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --parallelism.host_embedding=true ;;
    compiled_noac) recipe compiled_noac "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --activation_checkpoint.mode=none ;;
    compiled_cg) recipe compiled_cg "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --activation_checkpoint.mode=none --training.compile_mode=reduce-overhead ;;
    eager_fsdp1) recipe eager_fsdp1 "$ROOT" 1 -m recipe.train "${common[@]}" --parallelism.single_rank_fsdp=true ;;
    compiled_fsdp1) recipe compiled_fsdp1 "$ROOT" 1 -m recipe.train "${common[@]}" --training.compile=true \
        --parallelism.single_rank_fsdp=true ;;
    compiled_lean) recipe compiled_lean "$ROOT" 1 -m recipe.train "${common[@]}" "${lean[@]}" --training.compile=true ;;
    old_eager) recipe old_eager "$OLD" 1 -m recipe.train "${old_common[@]}" ;;
    old_compiled) recipe old_compiled "$OLD" 1 -m recipe.train "${old_common[@]}" --training.compile=true ;;
    old_default) recipe old_default "$OLD" 1 -m recipe.train "${common[@]}" "${auto[@]}" ;;
    recipe2) recipe recipe2 "$ROOT" 2 "${two[@]}" "${common[@]}" --training.steps=1 --parallelism.backend=gloo ;;
    recipe2_lean) recipe recipe2_lean "$ROOT" 2 "${two[@]}" "${common[@]}" --training.steps=1 \
        --parallelism.backend=gloo "${lean[@]}" ;;
    hf_loop) script hf_loop 1 benchmarks/hf_plain_loop.py --checkpoint "$CK" --steps "$STEPS" --out "$OUT/hf_loop.json" ;;
    hf_trainer) script hf_trainer 1 benchmarks/hf_trainer_fsdp.py "${hfargs[@]}" --out "$OUT/hf_trainer.json" ;;
    adapter) script adapter 1 benchmarks/hf_trainer_fsdp.py "${hfargs[@]}" --recipe --out "$OUT/adapter.json" ;;
    adapter2) script adapter2 2 .whl/tools/one_gpu_ranks.py benchmarks/hf_trainer_fsdp.py --checkpoint "$CK" \
        --steps 1 --warmup 0 --recipe --ddp-backend gloo --out "$OUT/adapter2.json" ;;
    oracle|compile_check) TMO=${OTMO:-420} script oracle 1 benchmarks/oracle.py --out "$OUT/oracle.json" \
        ${OVARIANTS:+--variants "$OVARIANTS"} "${common[@]}" \
        --training.global_batch_size=2 --job.dump_folder="$OUT/oracle" ;;
    host_cost) PYTHONPATH="$SITE:$ROOT" timeout "$TMO" $PY benchmarks/host_cost.py 2>&1 | grep -v kernels-community \
        | tee "$OUT/host_cost.txt"; keep "$OUT/host_cost.txt" ;;
    profile) script profile 1 benchmarks/profile_step.py "${common[@]}" --training.steps=4 --job.dump_folder="$OUT/profile" ;;
    profile_compiled) script profile_compiled 1 benchmarks/profile_step.py "${common[@]}" --training.steps=4 \
        --training.compile=true --job.dump_folder="$OUT/profile_compiled" ;;
    profile_default) script profile_default 1 benchmarks/profile_step.py "${common[@]}" "${auto[@]}" \
        --training.steps=4 --job.dump_folder="$OUT/profile_default" ;;
    unsloth|unsloth_mb4)  # the workload's micro-batch 2 x 4, or 4 x 2 (the same tokens per step)
      t=$SECONDS
      layout=(); [ "$r" = unsloth_mb4 ] && layout=(--bs 4 --ga 2)
      OUT="$OUT/${r}_logs" BENCH_ARGS="--steps $STEPS ${layout[*]}" timeout "${UTMO:-300}" bash .whl/tools/unsloth/run.sh \
          "$CK" >"$OUT/$r.log" 2>&1
      echo "[$r] rc=$? $((SECONDS - t))s"
      grep -E "^RESULT" "$OUT/$r.log" | tail -1 | sed 's/^RESULT //' >"$OUT/$r.json"
      keep "$OUT/$r.json"
      grep -E "Error|error:" "$OUT/$r.log" | tail -4 ;;
    *) echo "unknown run $r" ;;
  esac
done
PYTHONPATH="$SITE:$ROOT" $PY "$ROOT/benchmarks/single_gpu_report.py" "$OUT"
