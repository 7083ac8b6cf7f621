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
#
# Environment variables read here (all optional):
#   NGPU           processes (ranks) on this machine                        (default 1)
#   CONFIG_FILE    the TOML job file                      (default train_configs/debug_model.toml)
#   NNODES, NODE_RANK, RDZV_ENDPOINT, RDZV_ID   several machines, as above  (default NNODES=1)
#   SLURM_JOB_ID   the default RDZV_ID under Slurm
#   PYTHON         the interpreter            (default .venv/bin/python next to this script, else python3)
#   PYTHONPATH     kept; this repository is put in front of it
#   TMPDIR         where the launcher log goes when the run's dump folder is not known yet (default /tmp)
#
# Output: the ranks print to this terminal; torchrun's own report (its warnings and the ~30-line failure
# report) goes to a launcher log, <dump_folder>/launcher.log (else $TMPDIR/run_train-<pid>.log), and a
# failed run ends with one line naming the cause and that file. Exit codes: 0 done, 2 bad input (the line
# says the fix), 3 training diverged, 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the
# same command to resume), else a rank failed (its traceback is above, torchrun's report in the log).
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

for arg in "$@"; do
  if [[ $arg == --help || $arg == -h ]]; then
    # This script's own part of the header (from "Launch" to "set -euo"), then the training options.
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo
    echo "Training options (python -m recipe.train --help):"
    exec "$PYTHON" -m recipe.train --help
  fi
done

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
# The ranks watch this pid (recipe/run_guard.py): killed with SIGKILL, nothing of the run goes on.
export RECIPE_LAUNCHER_PID=$$
log="$RECIPE_EXIT_STATUS_DIR/launcher.log"
trap 'rm -rf "$RECIPE_EXIT_STATUS_DIR"' EXIT
rc=0
# recipe/launcher.py is torchrun with its own output (warnings, failure report, traceback) sent to $log.
"$PYTHON" -m recipe.launcher --log "$log" "${launch[@]}" --nproc_per_node="$NGPU" \
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
if [[ $rc -eq 0 ]]; then
  exit 0
fi
# Keep torchrun's report: next to the run's results when rank 0 got as far as holding its dump folder.
kept="${TMPDIR:-/tmp}/run_train-$$.log"
if [[ -f "$RECIPE_EXIT_STATUS_DIR/dump_folder" ]]; then
  dump=$(cat "$RECIPE_EXIT_STATUS_DIR/dump_folder")
  [[ -d "$dump" ]] && kept="$dump/launcher.log"
fi
if [[ -f "$log" ]]; then mv -f "$log" "$kept" 2>/dev/null || kept="$log (lost)"; else : >"$kept"; fi
# One line per failure. Rank 0's record first; any other complete one says the same code:
# 2 bad input, 3 diverged (NaN/inf steps in a row), 75 preempted (a checkpoint was saved). Under this
# script the ranks print no line of their own for 2 and 3 (recipe/exit_status.py): this is the one.
for record in "$RECIPE_EXIT_STATUS_DIR/rank0" "$RECIPE_EXIT_STATUS_DIR"/rank*; do
  [[ -f "$record" ]] || continue
  code=$(head -n 1 "$record")
  case $code in
    2) what="stopped on bad input" ;;
    3) what="stopped: training diverged" ;;
    75) what="preempted" ;;
    *) continue ;;
  esac
  if [[ $code -eq 75 ]]; then
    echo "run_train.sh: $what: $(tail -n +2 "$record")" >&2
  else
    echo "run_train.sh: $what: $(tail -n +2 "$record") [torchrun's report: $kept]" >&2
  fi
  exit "$code"
done
echo "run_train.sh: a rank failed (exit $rc): its own output is above; torchrun's report: $kept" >&2
exit "$rc"
