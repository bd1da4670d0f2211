#!/bin/bash
# Launch a distributed job with MindSpore's msrun (dynamic cluster: no rank table).
# Run `bash scripts/msrun_launcher.sh --help` for the arguments.

usage() {
  cat <<'EOF'
Usage:
  bash scripts/msrun_launcher.sh "<command>" [WORKER_NUM] [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR
                                              JOIN CLUSTER_TIME_OUT]

  <command>         the script and its arguments, in one quoted string, e.g.
                    "run_mindformer.py --config configs/gpt2/run_gpt2_tiny.yaml --use_parallel True --run_mode train"
                    (a leading "python" is dropped: msrun starts the script with python itself)
  WORKER_NUM        processes in the whole job, on all nodes (default 8)
  LOCAL_WORKER      processes on this node (default WORKER_NUM: a single node)
  MASTER_ADDR       IP or host name of node 0, where msrun's scheduler runs (default 127.0.0.1)
  MASTER_PORT       scheduler port, 1024..65535, the same on every node (default 8118)
  NODE_RANK         index of this node, 0 .. nodes-1 (default 0)
  LOG_DIR           where msrun writes scheduler.log and worker_<rank>.log (default output/msrun_log)
  JOIN              True: wait for the workers, then print how each ended (naming the worker_<rank>.log of one
                    that failed) and exit 0 only when every worker finished; False: return once they are
                    started (default False)
  CLUSTER_TIME_OUT  seconds to wait for all nodes to join; negative waits forever (default 7200)

Optional arguments are positional: to set one, give all before it.
Single node, 8 processes:
  bash scripts/msrun_launcher.sh "run_mindformer.py --config CONFIG --use_parallel True --run_mode train"
Single node, 2 processes on CPU, wait for them:
  bash scripts/msrun_launcher.sh "run_mindformer.py --config CONFIG --use_parallel True --run_mode train" \
       2 2 127.0.0.1 8118 0 output/msrun_log True
Two nodes of 8 (run on each node, NODE_RANK 0 on the node whose IP is MASTER_ADDR):
  node 0: bash scripts/msrun_launcher.sh "<command>" 16 8 192.168.1.1 8118 0 output/msrun_log False 300
  node 1: bash scripts/msrun_launcher.sh "<command>" 16 8 192.168.1.1 8118 1 output/msrun_log False 300

Environment: MF_LAUNCH_DRY_RUN=1 prints the msrun command instead of running it.
EOF
}

fail() {
  echo "msrun_launcher.sh: error: $*" >&2
  exit 1
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

if [ "$1" == "-h" ] || [ "$1" == "--help" ]; then
  usage
  exit 0
fi
if [ $# -lt 1 ] || [ $# -gt 9 ]; then
  fail "expected 1 to 9 arguments (\"<command>\" [WORKER_NUM] [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK" \
       "LOG_DIR JOIN CLUSTER_TIME_OUT]), got $#"
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
PYTHON=${PYTHON:-python}

EXECUTE_ORDER=$1
WORKER_NUM=${2:-8}
LOCAL_WORKER=${3:-$WORKER_NUM}
MASTER_ADDR=${4:-127.0.0.1}
MASTER_PORT=${5:-8118}
NODE_RANK=${6:-0}
LOG_DIR=${7:-output/msrun_log}
JOIN=${8:-False}
CLUSTER_TIME_OUT=${9:-7200}

is_uint "$WORKER_NUM" && [ "$WORKER_NUM" -ge 1 ] || fail "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
is_uint "$LOCAL_WORKER" && [ "$LOCAL_WORKER" -ge 1 ] \
  || fail "LOCAL_WORKER must be a positive integer, got '$LOCAL_WORKER'"
[ "$LOCAL_WORKER" -le "$WORKER_NUM" ] \
  || fail "LOCAL_WORKER ($LOCAL_WORKER) must not exceed WORKER_NUM ($WORKER_NUM), the processes of all nodes"
is_uint "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1024 ] && [ "$MASTER_PORT" -le 65535 ] \
  || fail "MASTER_PORT must be an integer in 1024..65535, got '$MASTER_PORT'"
NODE_NUM=$(( (WORKER_NUM + LOCAL_WORKER - 1) / LOCAL_WORKER ))
is_uint "$NODE_RANK" || fail "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
[ "$NODE_RANK" -lt "$NODE_NUM" ] \
  || fail "NODE_RANK ($NODE_RANK) must be less than the number of nodes ($NODE_NUM = WORKER_NUM $WORKER_NUM /" \
          "LOCAL_WORKER $LOCAL_WORKER)"
[[ "$MASTER_ADDR" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] \
  || fail "MASTER_ADDR must be an IP address or host name, got '$MASTER_ADDR'"
if [[ "$MASTER_ADDR" =~ ^[0-9.]+$ ]]; then
  IFS=. read -r -a OCTETS <<< "$MASTER_ADDR"
  [ ${#OCTETS[@]} -eq 4 ] || fail "MASTER_ADDR '$MASTER_ADDR' is not an IPv4 address"
  for octet in "${OCTETS[@]}"; do
    is_uint "$octet" && [ "$octet" -le 255 ] || fail "MASTER_ADDR '$MASTER_ADDR' is not an IPv4 address"
  done
fi
case "${JOIN,,}" in
  true) JOIN=True ;;
  false) JOIN=False ;;
  *) fail "JOIN must be True or False, got '$JOIN'" ;;
esac
[[ "$CLUSTER_TIME_OUT" =~ ^-?[0-9]+$ ]] || fail "CLUSTER_TIME_OUT must be an integer (seconds), got '$CLUSTER_TIME_OUT'"
[ -n "$LOG_DIR" ] || fail "LOG_DIR must not be empty"

# split the command as a shell would (quotes kept, nothing expanded)
WORDS=$("$PYTHON" -c 'import shlex, sys
try:
    print(" ".join(shlex.quote(word) for word in shlex.split(sys.argv[1])))
except ValueError as err:
    sys.exit(f"msrun_launcher.sh: error: cannot split the command: {err}")' "$EXECUTE_ORDER") || exit 1
eval "COMMAND=($WORDS)"  # safe: every word was quoted by shlex.quote
if [ ${#COMMAND[@]} -gt 0 ] && [[ "$(basename "${COMMAND[0]}")" =~ ^python[0-9.]*$ ]]; then
  COMMAND=("${COMMAND[@]:1}")
fi
[ ${#COMMAND[@]} -gt 0 ] || fail "the command is empty; give the script to run, e.g. \"run_mindformer.py --config ...\""
TASK_SCRIPT=${COMMAND[0]}
if [ ! -f "$TASK_SCRIPT" ] && [ -f "$REPO_DIR/$TASK_SCRIPT" ]; then
  TASK_SCRIPT="$REPO_DIR/$TASK_SCRIPT"
fi
[ -f "$TASK_SCRIPT" ] || fail "script '${COMMAND[0]}' of the command does not exist (from $(pwd))"
COMMAND[0]=$TASK_SCRIPT

# --config: a file must exist; a bare name (no '/', no .yaml) may be a registered model name
for ((i = 1; i < ${#COMMAND[@]}; i++)); do
  CONFIG=""
  case "${COMMAND[$i]}" in
    --config) CONFIG=${COMMAND[$((i + 1))]:-}; [ -n "$CONFIG" ] || fail "--config in the command has no value" ;;
    --config=*) CONFIG=${COMMAND[$i]#--config=} ;;
  esac
  if [ -n "$CONFIG" ] && [ ! -f "$CONFIG" ] && [[ "$CONFIG" == */* || "$CONFIG" == *.yaml || "$CONFIG" == *.yml ]]
  then
    fail "config file '$CONFIG' of the command does not exist (from $(pwd))"
  fi
done

if [ "$JOIN" == True ]; then  # each worker records how it ended beside its log (msrun_worker.py)
  COMMAND=("$REPO_DIR/mindformers/tools/msrun_worker.py" "$LOG_DIR" "${COMMAND[@]}")
fi
MSRUN=(msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR"
       --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN"
       --cluster_time_out="$CLUSTER_TIME_OUT" "${COMMAND[@]}")

if [ -n "$MF_LAUNCH_DRY_RUN" ] && [ "$MF_LAUNCH_DRY_RUN" != "0" ]; then
  printf '%q ' "${MSRUN[@]}"
  echo
  exit 0
fi
command -v msrun > /dev/null || fail "msrun is not on PATH (it comes with MindSpore >= 2.3: pip install mindspore)"
echo "msrun_launcher.sh: $WORKER_NUM worker(s), $LOCAL_WORKER on this node (node $NODE_RANK of $NODE_NUM)," \
     "scheduler $MASTER_ADDR:$MASTER_PORT; logs in $LOG_DIR/worker_<rank>.log" >&2
if [ "$JOIN" != True ]; then
  exec "${MSRUN[@]}"
fi
# with JOIN: msrun's verdict can blame the wrong worker, or report a failure after every worker finished; each
# worker's log says how it ended, and the summary names the log of the one that ended abnormally
START=$(date +%s)
"${MSRUN[@]}"
STATUS=$?
"$PYTHON" "$REPO_DIR/mindformers/tools/msrun_summary.py" "$LOG_DIR" "$STATUS" "$((START - 1))"
