#!/usr/bin/env bash
# Launch a training job with torchrun, torchtitan-style.
#
#   ./run_train.sh                                   # debug model (train_configs/debug_model.toml)
#   NGPU=2 CONFIG_FILE=train_configs/llama3_8b_qlora.toml ./run_train.sh --training.steps=100
#
# NGPU: processes on this machine (GPUs with CUDA: NCCL; without CUDA: CPU processes over gloo).
# CONFIG_FILE: the TOML job file. Extra arguments are --section.key=value overrides.
set -euo pipefail
# Relative paths (CONFIG_FILE, --data.path, --job.dump_folder, ...) are the caller's: no cd.
REPO="$(cd "$(dirname "$0")" && pwd)"

NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-"$REPO/train_configs/debug_model.toml"}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! [[ "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_train.sh: NGPU must be a positive integer, got '$NGPU'" >&2
  exit 2
fi
if [[ ! -f "$CONFIG_FILE" ]]; then
  echo "run_train.sh: CONFIG_FILE '$CONFIG_FILE' does not exist (configs: $(ls "$REPO"/train_configs/*.toml | tr '\n' ' '))" >&2
  exit 2
fi

# torchrun reports any failed rank as exit 1; a rank stopped by bad input (config, checkpoint, data,
# layout) writes its exit code 2 here, so this script can return it.
RECIPE_EXIT_STATUS_FILE="$(mktemp)"
export RECIPE_EXIT_STATUS_FILE
trap 'rm -f "$RECIPE_EXIT_STATUS_FILE"' EXIT
rc=0
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
  -m recipe.train --job.config_file "$CONFIG_FILE" "$@" || rc=$?
if [[ $rc -ne 0 && -s "$RECIPE_EXIT_STATUS_FILE" ]]; then
  rc=$(head -n 1 "$RECIPE_EXIT_STATUS_FILE")
  # Repeat the cause below torchrun's failure report, where it is seen.
  echo "run_train.sh: stopped on bad input: $(tail -n +2 "$RECIPE_EXIT_STATUS_FILE")" >&2
fi
exit "$rc"
