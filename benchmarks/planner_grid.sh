#!/usr/bin/env bash
# Issue 24 point 4's GPU check of recipe.planner: a small measured grid on ONE GPU against the layout that
# --parallelism.plan=auto picks. The 8B job (train_configs/llama3_8b_qlora.toml: seq 2048, global batch 8),
# one rank capped at CAP GiB (default 24: a 24 GiB card, where the choice is not trivial), STEPS steps each
# (tokens/s: median after 3 warm-up steps). `check` prints one table and the verdict: the planned run did not
# run out of memory and is within 10 % of the fastest measured layout that fits.
#
#   export PYTHONPATH=$PWD/.whl/site:$PWD                             # with carry: [".whl"]
#   RUNS="ckpt plan full_mb2 full_mb8 sel_mb1" bash benchmarks/planner_grid.sh $OUT/g
#   RUNS="sel_mb2 none_mb1 full_mb4 lean_mb8 check" bash benchmarks/planner_grid.sh $OUT/g   # same warm machine
#   RUNS="sel_mb2_off full_mb4_off full_mb8_off check" ...   layouts with activation offload (and kept outputs)
set -u
OUT=${1:-/tmp/planner_grid}
mkdir -p "$OUT"
PY=${PY:-python3}
CK8=${CK8:-/tmp/ck_llama3_1_8b_nf4}
CAP=${CAP-24}
STEPS=${STEPS:-8}
TMO=${TMO:-200}
RANKS=${RANKS:-${ONE_GPU_RANKS:-.whl/tools/one_gpu_ranks.py}}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
BASE=(--job.config_file train_configs/llama3_8b_qlora.toml --model.checkpoint="$CK8" --model.synthetic_shape=llama3_1_8b
      --training.global_batch_size=8 --training.steps="$STEPS" --checkpoint.enable=false --metrics.log_freq=1
      --parallelism.host_embedding=false --parallelism.host_lm_head=false --activation_checkpoint.offload=false
      ${EXTRA:-})  # rows as named ('auto' would turn these three on)

run() {  # name overrides...
  local name=$1; shift
  local args=("${BASE[@]}" "$@" --job.dump_folder="$OUT/$name" --checkpoint.export_adapter=false)
  printf '%s\n' 1 "$CAP" "${args[@]}" >"$OUT/$name.args"
  local t0=$SECONDS
  GPU_MEM_CAP_GIB=$CAP timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node 1 "$RANKS" \
    -m recipe.train "${args[@]}" >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t0))s | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null
  grep -E "out of memory|Error|error:" "$OUT/$name.log" | grep -v "^\[rank[1-9]\]" | tail -2
}
ac() { echo --activation_checkpoint.mode="$1" --training.micro_batch_size="$2"; }

for r in ${RUNS:-ckpt plan full_mb2 check}; do
  case $r in
    ckpt) [ -f "$CK8/config.json" ] || $PY -m models.synthetic --shape llama3_1_8b --out "$CK8" --device cuda | tail -1 ;;
    plan) run plan --parallelism.plan=auto; grep -A6 "^plan for" "$OUT/plan.log" ;;
    full_mb2) run full_mb2 $(ac full 2) ;;
    full_mb4) run full_mb4 $(ac full 4) ;;
    full_mb8) run full_mb8 $(ac full 8) ;;
    sel_mb1) run sel_mb1 $(ac selective 1) ;;
    sel_mb2) run sel_mb2 $(ac selective 2) ;;
    none_mb1) run none_mb1 $(ac none 1) ;;
    lean_mb8) run lean_mb8 $(ac full 8) --activation_checkpoint.offload=true --parallelism.host_embedding=true ;;
    # with activation offload (and so, on this one rank, o/gate/up kept in every 2nd checkpointed block)
    sel_mb2_off) run sel_mb2_off $(ac selective 2) --activation_checkpoint.offload=true ;;
    full_mb4_off) run full_mb4_off $(ac full 4) --activation_checkpoint.offload=true ;;
    full_mb8_off) run full_mb8_off $(ac full 8) --activation_checkpoint.offload=true ;;
    check)
      $PY benchmarks/scale_report.py "$OUT" $(cd "$OUT" && ls *.args | sed 's/\.args$//')
      $PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
tps = {}
for a in out.glob("*.args"):
    s = out / (a.stem + ".summary.json")
    tps[a.stem] = json.loads(s.read_text())["ranks"][0]["tokens_per_s_per_gpu"] if s.exists() else None
ok = {k: v for k, v in tps.items() if v}
if tps.get("plan") is None:
    print("VERDICT: FAIL - the planned run did not finish (out of memory or error: see plan.log)")
else:
    best = max(ok, key=ok.get)
    ratio = tps["plan"] / ok[best]
    print(f"VERDICT: {'PASS' if ratio >= 0.9 else 'FAIL'} - plan {tps['plan']:,.0f} tokens/s, fastest measured {best} "
          f"{ok[best]:,.0f} ({ratio:.1%}); failed runs: {sorted(k for k, v in tps.items() if not v) or 'none'}")
PYEOF
      ;;
    *) echo "unknown run $r" ;;
  esac
done
