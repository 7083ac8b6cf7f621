#!/usr/bin/env bash
# Two Kaggle T4s emulated on ONE bigger GPU (issue 12's GPU checks): every rank on cuda:0 over gloo
# (${ONE_GPU_RANKS:-.whl/tools/one_gpu_ranks.py}), each capped at 15 GiB, train_configs/llama3_8b_qlora_t4.toml (fp16,
# seq 2048, micro-batch 2, global batch 8, full AC) with the SDPA kernels a T4 has forced
# (--training.attention_backend=efficient), the 8B shape (a synthetic nf4 checkpoint: no hub access),
# and a local OIG-format JSONL written here.
#
#   STAGES="ckpt r1_cmp r2_cmp" bash benchmarks/t4_emulation.sh OUTDIR     # then: offload, r1_60, report
#
# r1_cmp / r2_cmp: 1 and 2 ranks, CMP_STEPS steps (the per-step loss comparison; CMP_ARGS adds overrides to
# both, e.g. "--data.seq_len=512" for 10 two-rank steps within one 10-minute call); r1_60: 1 rank, 60 steps (no
# out-of-memory, fp16 skips counted); offload: 2 ranks, OFFLOAD_STEPS steps with --parallelism.cpu_offload;
# report: per run the skipped steps, peak GPU memory per rank (load, train), host peak per rank and
# their sum (Kaggle: 29 GiB for both), and max |loss(2 ranks) - loss(1 rank)|. Speed through gloo means
# nothing (about 250 tokens/s for two ranks): a 2-rank step of 16k tokens takes about a minute.
set -u
OUT=${1:-/tmp/t4emu}
mkdir -p "$OUT"
PY=${PY:-python3}
CK8=${CK8:-/tmp/ck_llama3_1_8b_nf4}
DATA=$OUT/oig.jsonl
CMP_STEPS=${CMP_STEPS:-10}  # the issue asks for 10; at ~65 s per 2-rank step that is ~11 min: 8 fits one call
OFFLOAD_STEPS=${OFFLOAD_STEPS:-3}
TMO=${TMO:-590}
SITE=${SITE:-$PWD/.whl/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPU_MEM_CAP_GIB=15 PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

run() {  # name nproc steps overrides...
  local name=$1 n=$2 steps=$3; shift 3
  local t0=$SECONDS
  timeout "$TMO" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" ${ONE_GPU_RANKS:-.whl/tools/one_gpu_ranks.py} \
    -m recipe.train --job.config_file train_configs/llama3_8b_qlora_t4.toml --parallelism.backend=gloo \
    --training.attention_backend=efficient --model.checkpoint="$CK8" --model.synthetic_shape=llama3_1_8b \
    --data.path="$DATA" --training.steps="$steps" --checkpoint.enable=false --checkpoint.export_adapter=false \
    --job.dump_folder="$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $((SECONDS - t0))s | $(grep -E '^attention' "$OUT/$name.log") | $(grep -E '^step' "$OUT/$name.log" | tail -1)"
  cp "$OUT/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null  # the device copies back shallow files only
  cp "$OUT/$name/metrics/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  grep -E "Error|error|overflow" "$OUT/$name.log" | grep -v "^\[rank[1-9]\]" | tail -4
}

for st in ${STAGES:-ckpt r1_cmp r2_cmp}; do
  case $st in
    ckpt)
      [[ -f "$CK8/config.json" ]] || $PY -m models.synthetic --shape llama3_1_8b --out "$CK8" --device cuda
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
    r2_cmp) run r2_cmp 2 "$CMP_STEPS" ${CMP_ARGS:-} ;;
    r1_60) run r1_60 1 60 ;;
    offload) run offload 2 "$OFFLOAD_STEPS" --parallelism.cpu_offload=true ;;
    report)
      $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(n):
    p = out / f"{n}.metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
for n in ("r1_cmp", "r2_cmp", "r1_60", "offload"):
    p = out / f"{n}.summary.json"
    if not p.exists():
        print(f"{n}: no summary"); continue
    s = json.loads(p.read_text())
    rs = s["ranks"]
    print(f"{n}: {s['world']} rank(s), {len(s['losses'])} steps, {sum(r['skipped'] for r in rows(n))} fp16 skips; "
          + "; ".join(f"rank {r['rank']}: load {r['load_peak_gib']:.2f} / train {r['train_peak_gib']:.2f} GiB GPU, "
                      f"host {r['host_peak_rss_gib']:.2f} GiB" for r in rs)
          + f"; host all ranks {sum(r['host_peak_rss_gib'] for r in rs):.2f} GiB")
a, b = rows("r1_cmp"), rows("r2_cmp")
if a and b:
    d = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    print(f"max |loss(2 ranks) - loss(1 rank)| over {len(d)} steps: {max(d):.2e} (issue: within 2e-3)")
EOF
      ;;
  esac
done
