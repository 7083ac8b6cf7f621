#!/usr/bin/env bash
# Launch a training job with torchrun, torchtitan-style.
#
#   ./run_train.sh                                   # debug model (train_configs/debug_model.toml)
#   NGPU=2 CONFIG_FILE=train_configs/llama3_8b_qlora.toml ./run_train.sh --training.steps=100
#
# Several machines: the same command on every node, with the same NNODES, RDZV_ENDPOINT and RDZV_ID:
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 NGPU=8 ./run_train.sh ...     # on node0
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 NGPU=8 ./run_train.sh ...     # on node1
# (examples/slurm_multinode.sbatch does this under Slurm.)
#
# NGPU: processes on this machine (GPUs with CUDA: NCCL; without CUDA: CPU processes over gloo).
# CONFIG_FILE: the TOML job file. Extra arguments are --section.key=value overrides.
# NNODES: machines in the job (default 1: torchrun --standalone, and the RDZV_* variables are unused).
# With NNODES > 1, torchrun meets the other nodes through its c10d rendezvous:
#   RDZV_ENDPOINT  host:port of the rendezvous store, the same on every node (a host all nodes reach;
#                  by convention node 0's hostname);
#   NODE_RANK      0 on the node RDZV_ENDPOINT names (it hosts the store), 1..NNODES-1 on the others.
#                  The c10d rendezvous numbers the nodes itself (torchrun uses --node-rank only for its
#                  static rendezvous): rank 0 may be on any node; the ranks of one node are consecutive;
#   RDZV_ID        a job id shared by the nodes of one job (default: SLURM_JOB_ID, else qlora).
set -euo pipefail
# Relative paths (CONFIG_FILE, --data.path, --job.dump_folder, ...) are the caller's: no cd.
REPO="$(cd "$(dirname "$0")" && pwd)"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-"$REPO/train_configs/debug_model.toml"}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! [[ "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_train.sh: NGPU must be a positive integer, got '$NGPU'" >&2
  exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_train.sh: NNODES must be a positive integer, got '$NNODES'" >&2
  exit 2
fi
if [[ $NNODES -eq 1 ]]; then
  launch=(--standalone)
else
  if ! [[ "${RDZV_ENDPOINT:-}" =~ ^[^:]+:[0-9]+$ ]]; then
    echo "run_train.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the rendezvous store, the same on every" \
      "node, e.g. node 0's hostname and a free port), got '${RDZV_ENDPOINT:-}'" >&2
    exit 2
  fi
  if ! [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] || [[ $NODE_RANK -ge $NNODES ]]; then
    echo "run_train.sh: NNODES=$NNODES needs NODE_RANK in 0..$((NNODES - 1)) (0 on the node RDZV_ENDPOINT" \
      "names), got '${NODE_RANK:-}'" >&2
    exit 2
  fi
  if [[ $NODE_RANK -eq 0 ]]; then is_host=1; else is_host=0; fi
  launch=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
    --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-qlora}}" --rdzv-conf="is_host=$is_host")
fi
if [[ ! -f "$CONFIG_FILE" ]]; then
  configs=$(ls "$REPO"/train_configs/*.toml | tr '\n' ' ')
  echo "run_train.sh: CONFIG_FILE '$CONFIG_FILE' does not exist (configs: $configs)" >&2
  exit 2
fi

# torchrun reports any failed rank as exit 1; a rank stopped by bad input (config, checkpoint, data,
# layout) records its exit code 2 here, so this script can return it (on every node: each node's ranks
# record in this node's directory). One record per rank, each
# written by rename (recipe/exit_status.py): torchrun's SIGTERM to the other ranks, once one exits,
# can leave a record missing but never empty or another rank's overwritten.
RECIPE_EXIT_STATUS_DIR="$(mktemp -d)"
export RECIPE_EXIT_STATUS_DIR
trap 'rm -rf "$RECIPE_EXIT_STATUS_DIR"' EXIT
rc=0
"$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$NGPU" \
  -m recipe.train --job.config_file "$CONFIG_FILE" "$@" &
child=$!
# SIGTERM / SIGINT to this script (Kaggle, Slurm, Ctrl-C) go on to torchrun, which passes them to every
# rank: the ranks finish the step, save a checkpoint and exit 75. Wait again after a trapped signal.
trap 'kill -s TERM "$child" 2>/dev/null' TERM INT
while true; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
trap - TERM INT
if [[ $rc -ne 0 ]]; then
  # Rank 0's record first: the message it printed above. Any other complete one says the same code:
  # 2 bad input, 3 diverged (NaN/inf steps in a row), 75 preempted (a checkpoint was saved).
  for record in "$RECIPE_EXIT_STATUS_DIR/rank0" "$RECIPE_EXIT_STATUS_DIR"/rank*; do
    [[ -f "$record" ]] || continue
    code=$(head -n 1 "$record")
    case $code in
      2) what="stopped on bad input" ;;
      3) what="stopped: training diverged" ;;
      75) what="preempted" ;;
      *) continue ;;
    esac
    rc=$code
    # Repeat the cause below torchrun's failure report, where it is seen.
    echo "run_train.sh: $what: $(tail -n +2 "$record")" >&2
    break
  done
fi
exit "$rc"
