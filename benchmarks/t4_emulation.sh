#!/usr/bin/env bash
# Two Kaggle T4s emulated on ONE bigger GPU (issues 12 and 21): every rank on cuda:0 over gloo
# (${ONE_GPU_RANKS:-.whl/tools/one_gpu_ranks.py}), each capped at 15 GiB, train_configs/llama3_8b_qlora_t4.toml (fp16,
# seq 2048, micro-batch 2, global batch 8, full AC) with the SDPA kernels a T4 has forced
# (--training.attention_backend=efficient), the 8B shape (a synthetic nf4 checkpoint: no hub access),
# and a local OIG-format JSONL written here. What only a real T4 shows: speed (gloo through the host: a
# 2-rank step of 16k tokens takes about 65 s), PCIe traffic, a T4's own kernels and its 70 W clocks.
#
# Stages, each one device call of at most 10 minutes (TMO=590 s per run); the synthetic checkpoint ($CK8)
# and the run folders under OUTDIR are reused by the later stages while the machine stays warm:
#
#   STAGES="ckpt r1_cmp" bash benchmarks/t4_emulation.sh OUTDIR    # ~1.5 min: the 8B checkpoint, 1 rank x 10 steps
#   STAGES="r2_cmp_a" bash benchmarks/t4_emulation.sh OUTDIR       # 2 ranks, steps 1-5, then SIGTERM: saved, exit 75
#   STAGES="r2_cmp_b report" bash benchmarks/t4_emulation.sh OUTDIR  # resumed: steps 6-10; max |loss diff| over 10
#   STAGES="r1_60 report" bash benchmarks/t4_emulation.sh OUTDIR   # 60 fp16 steps on 1 rank (OOM? overflow skips?)
#   STAGES="r1_bf16 report" ...                                    # r1_cmp in bf16: the fp16 losses against bf16's
#   STAGES="offload report" bash benchmarks/t4_emulation.sh OUTDIR # 2 ranks, OFFLOAD_STEPS steps, CPU offload
#   STAGES="r2_plan report" bash benchmarks/t4_emulation.sh OUTDIR  # 2 ranks, the planner's T4 layout, CMP_STEPS steps
#   STAGES="shard_mem noreshard_mem report" ...   # 2 ranks, full sharding with / without resharding, MEM_STEPS steps
#
# r1_cmp / r2_cmp: 1 and 2 ranks, CMP_STEPS (10) steps at the config's seq 2048 for the per-step loss
# comparison (within 2e-3); the 2-rank run is split at CMP_SPLIT (5): the first part is stopped by SIGTERM
# once step CMP_SPLIT is logged (every rank finishes it, saves a checkpoint and exits 75: the preemption
# path the Kaggle notebook also uses), the second part is the same command, which resumes from that
# checkpoint (exact: tests/test_checkpoint.py) and appends steps 6-10 to the same metrics.jsonl.
# CMP_ARGS adds overrides to both runs. r1_60: 1 rank, 60 steps (no out-of-memory, fp16 skips counted
# and the longest run of consecutive skips); offload: 2 ranks with --parallelism.cpu_offload; r2_plan: 2 ranks
# in the layout recipe.planner chooses for 2x T4 (PLAN_ARGS: `python -m recipe.estimate ... --plan
# --plan-args`; the notebook's 2-GPU run takes it with --parallelism.plan=auto), its memory per rank and
# its losses against r1_cmp (replication: no 4-bit all-gather, faster than r2_cmp through gloo).
# report: per run the skipped steps, peak GPU memory per rank (load, train), host peak per rank and their
# sum (Kaggle: 29 GiB for both), and max |loss(2 ranks) - loss(1 rank)|.
set -u
OUT=${1:-/tmp/t4emu}
mkdir -p "$OUT"
PY=${PY:-python3}
CK8=${CK8:-/tmp/ck_llama3_1_8b_nf4}
DATA=$OUT/oig.jsonl
CMP_STEPS=${CMP_STEPS:-10}  # the issue asks for 10; at ~65 s per 2-rank step that is ~11 min: split in two calls
OFFLOAD_STEPS=${OFFLOAD_STEPS:-3}
MEM_STEPS=${MEM_STEPS:-1}  # shard_mem / noreshard_mem: a step through gloo takes about 65 s
TMO=${TMO:-590}
SITE=${SITE:-$PWD/.whl/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPU_MEM_CAP_GIB=15 PYTHONPATH="$SITE:$PWD"
SHAPE=${SHAPE:-llama3_1_8b}  # SHAPE=debug CKPT_DEVICE=cpu ONE_GPU_RANKS= EXTRA_ARGS=...: a tiny CPU dry run of the stages
CKPT_DEVICE=${CKPT_DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Every run keeps no projection output (keep_outputs=''): what a rank of two T4s does ('auto' keeps them on
# one CUDA rank only), also in the one-rank runs.
run() {  # name nproc steps overrides...; PART=a|b names the log of a split run, STOP_AT=k stops it after step k
  local name=$1 n=$2 steps=$3; shift 3
  local log="$OUT/$name${PART:+.$PART}.log" t0=$SECONDS rc
  timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" ${ONE_GPU_RANKS-.whl/tools/one_gpu_ranks.py} \
    -m recipe.train --job.config_file train_configs/llama3_8b_qlora_t4.toml --parallelism.backend=gloo \
    --training.attention_backend=efficient --model.checkpoint="$CK8" --model.synthetic_shape="$SHAPE" \
    --data.path="$DATA" --training.steps="$steps" --checkpoint.enable=false --checkpoint.export_adapter=false \
    --activation_checkpoint.keep_outputs= --job.dump_folder="$OUT/$name" ${EXTRA_ARGS:-} "$@" >"$log" 2>&1 &
  local pid=$!
  if [[ -n "${STOP_AT:-}" ]]; then  # SIGTERM to timeout, which passes it to torchrun, which passes it to the ranks
    while kill -0 "$pid" 2>/dev/null; do
      if grep -qE "^step +$STOP_AT/" "$log"; then kill -TERM "$pid"; break; fi
      sleep 1
    done
  fi
  wait "$pid"; rc=$?
  echo "[$name${PART:+ part $PART}] rc=$rc $((SECONDS - t0))s | $(grep -E '^attention' "$log") | $(grep -E '^step' "$log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null  # the device copies back shallow files only
  cp "$OUT/$name/metrics/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  ls -d "$OUT/$name"/checkpoint/step-* 2>/dev/null | sed 's/^/  checkpoint: /'
  grep -E "Error|error|overflow|Preempted" "$log" | grep -v "^\[rank[1-9]\]" | tail -4
}

# The split 2-rank comparison run: a checkpoint kept only for the resume (large interval: saved on SIGTERM).
SPLIT=(--checkpoint.enable=true --checkpoint.interval=1000 --checkpoint.keep_latest_k=1)
CMP_SPLIT=${CMP_SPLIT:-5}
# What --parallelism.plan=auto runs on two real T4s (the notebook's 2-GPU run), from the planner itself,
# so that the emulation follows the planner when its model changes (here plan=auto would plan for the
# emulating GPU instead).
PLAN_ARGS=${PLAN_ARGS:-$($PY -m recipe.estimate --job.config_file train_configs/llama3_8b_qlora_t4.toml \
  --model.synthetic_shape="$SHAPE" --ngpu 2 --card t4 --plan --host-gib 29 --plan-args | tail -1)}
echo "planned 2x T4 layout: $PLAN_ARGS"

for st in ${STAGES:-ckpt r1_cmp r2_cmp}; do
  case $st in
    ckpt)
      [[ -f "$CK8/config.json" ]] || $PY -m models.synthetic --shape "$SHAPE" --out "$CK8" --device "$CKPT_DEVICE"
      # About 2M bytes of <human>: / <bot>: records (the synthetic tokenizer is byte-level): 60 steps
      # of 16k tokens on 1 rank without repeating a row.
      $PY - "$DATA" <<'EOF'
import json, random, sys
rng = random.Random(3407)
words = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
with open(sys.argv[1], "w") as f:
    for i in range(8000):
        q = " ".join(rng.choices(words, k=rng.randint(5, 30)))
        a = " ".join(rng.choices(words, k=rng.randint(20, 80)))
        f.write(json.dumps({"text": f"<human>: {q}?\n<bot>: {a}."}) + "\n")
EOF
      ;;
    r1_cmp) run r1_cmp 1 "$CMP_STEPS" ${CMP_ARGS:-} ;;
    r2_cmp) run r2_cmp 2 "$CMP_STEPS" ${CMP_ARGS:-} ;;  # unsplit: only where 10 steps fit one call (CMP_ARGS)
    r2_cmp_a) rm -rf "$OUT/r2_cmp"; PART=a STOP_AT=$CMP_SPLIT run r2_cmp 2 "$CMP_STEPS" "${SPLIT[@]}" ${CMP_ARGS:-} ;;
    r2_cmp_b) PART=b run r2_cmp 2 "$CMP_STEPS" "${SPLIT[@]}" ${CMP_ARGS:-} ;;
    r1_60) run r1_60 1 60 ;;
    r1_bf16) run r1_bf16 1 "$CMP_STEPS" --training.mixed_precision_param=bfloat16 ${CMP_ARGS:-} ;;  # the fp16 path's course
    offload) run offload 2 "$OFFLOAD_STEPS" --parallelism.cpu_offload=true ;;
    r2_plan) run r2_plan 2 "$CMP_STEPS" $PLAN_ARGS ${CMP_ARGS:-} ;;
    shard_mem) run shard_mem 2 "$MEM_STEPS" ;;  # the two sharded layouts' memory per rank (item 6 of issue 21)
    noreshard_mem) run noreshard_mem 2 "$MEM_STEPS" --parallelism.reshard_after_forward=false ;;
    report)
      $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(n):
    p = out / f"{n}.metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
def gib(x):
    return "n/a" if x is None else f"{x:.2f}"  # no GPU peak on a CPU dry run
def longest_skip_run(rs):
    best = cur = 0
    for r in rs:
        cur = cur + 1 if r["skipped"] else 0
        best = max(best, cur)
    return best
for n in ("r1_cmp", "r1_bf16", "r2_cmp", "r2_plan", "shard_mem", "noreshard_mem", "r1_60", "offload"):
    p = out / f"{n}.summary.json"
    if not p.exists():
        print(f"{n}: no summary"); continue
    s, m = json.loads(p.read_text()), rows(n)
    rs = s["ranks"]
    print(f"{n}: {s['world']} rank(s), {len(m)} steps logged (steps {m[0]['step']}-{m[-1]['step']}), "
          f"{sum(r['skipped'] for r in m)} fp16 skips (longest run {longest_skip_run(m)}); "
          + "; ".join(f"rank {r['rank']}: load {gib(r['load_peak_gib'])} / train {gib(r['train_peak_gib'])} GiB GPU, "
                      f"host {gib(r['host_peak_rss_gib'])} GiB" for r in rs)
          + f"; host all ranks {sum(r['host_peak_rss_gib'] for r in rs):.2f} GiB")
a = {r["step"]: r["loss"] for r in rows("r1_cmp")}
bf = {r["step"]: r["loss"] for r in rows("r1_bf16")}
if a and bf:  # fp16 with the loss scaler against bf16, same data and steps (issue 20, point 5)
    d = [abs(a[k] - bf[k]) / abs(bf[k]) for k in sorted(set(a) & set(bf))]
    print(f"max |loss(fp16) - loss(bf16)| / loss(bf16) over {len(d)} steps, 1 rank: {max(d):.2e}")
for n in ("r2_cmp", "r2_plan"):
    b = {r["step"]: r["loss"] for r in rows(n)}
    if a and b:
        if sorted(a) != sorted(b):
            print(f"steps differ: 1 rank {sorted(a)}, {n} {sorted(b)}")
        d = [abs(a[k] - b[k]) for k in sorted(set(a) & set(b))]
        print(f"max |loss({n}, 2 ranks) - loss(1 rank)| over {len(d)} steps: {max(d):.2e} (issue: within 2e-3)")
EOF
      ;;
  esac
done
