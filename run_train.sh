#!/usr/bin/env bash
# Launch a training job with torchrun, torchtitan-style.
#
#   ./run_train.sh                                   # debug model (train_configs/debug_model.toml)
#   NGPU=2 CONFIG_FILE=train_configs/llama3_8b_qlora.toml ./run_train.sh --training.steps=100
#
# NGPU: processes on this machine (GPUs with CUDA: NCCL; without CUDA: CPU processes over gloo).
# CONFIG_FILE: the TOML job file. Extra arguments are --section.key=value overrides.
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! [[ "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_train.sh: NGPU must be a positive integer, got '$NGPU'" >&2
  exit 2
fi
if [[ ! -f "$CONFIG_FILE" ]]; then
  echo "run_train.sh: CONFIG_FILE '$CONFIG_FILE' does not exist (configs: $(ls train_configs/*.toml | tr '\n' ' '))" >&2
  exit 2
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
  -m recipe.train --job.config_file "$CONFIG_FILE" "$@"
