#!/bin/bash
# Launch run_mindformer.py on Ascend with an HCCL rank table: one background process per device of this node.
# Run `bash scripts/run_distribute.sh --help` for the arguments.

usage() {
  cat <<'EOF'
Usage:
  bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG "[START,END)" RUN_MODE [RANK_SIZE] [PREDICT_DATA]

  RANK_TABLE_FILE  HCCL rank table (python -m mindformers.tools.hccl_tools; merge_hccl joins several servers)
  CONFIG           run config YAML
  [START,END)      the ranks this node starts, END excluded ("[0,8]" is read as [0,8) too, as in MindFormers)
  RUN_MODE         train, finetune, eval or predict
  RANK_SIZE        processes in the whole job; omit it (or give END-START) for a single node
  PREDICT_DATA     prompt for RUN_MODE predict

Single node: RANK_SIZE = END-START, RANK_ID = i-START, DEVICE_ID = i for i in [START,END), e.g. devices 4..7:
  bash scripts/run_distribute.sh hccl_4p_4567_10.0.0.1.json configs/llama2/run_llama2_7b.yaml "[4,8)" train
Multi node: every node gets the merged table, the global RANK_SIZE and its own global range;
RANK_ID = i, DEVICE_ID = i-START. Two servers of 8 devices:
  server 1: bash scripts/run_distribute.sh hccl_2s_16p.json CONFIG "[0,8)" train 16
  server 2: bash scripts/run_distribute.sh hccl_2s_16p.json CONFIG "[8,16)" train 16

Each process runs `python run_mindformer.py --config CONFIG --use_parallel True --run_mode RUN_MODE` in the
background, from the current directory, with RANK_TABLE_FILE, RANK_SIZE, RANK_ID and DEVICE_ID set; its console
output goes to output/log/rank_<RANK_ID>/worker.log (the mindformers log is written to
<output_dir>/log/rank_<RANK_ID>/mindformer.log as well).

Environment: MF_LAUNCH_DRY_RUN=1 checks everything and prints each process's environment and command without
starting it (works without Ascend).
EOF
}

fail() {
  echo "run_distribute.sh: error: $*" >&2
  exit 1
}

if [ "$1" == "-h" ] || [ "$1" == "--help" ]; then
  usage
  exit 0
fi
if [ $# -lt 4 ] || [ $# -gt 6 ]; then
  fail "expected 4 to 6 arguments (RANK_TABLE_FILE CONFIG \"[START,END)\" RUN_MODE [RANK_SIZE] [PREDICT_DATA])," \
       "got $#"
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
PYTHON=${PYTHON:-python}
DRY_RUN=0
if [ -n "$MF_LAUNCH_DRY_RUN" ] && [ "$MF_LAUNCH_DRY_RUN" != "0" ]; then
  DRY_RUN=1
fi

[ -f "$1" ] || fail "rank table file '$1' does not exist"
RANK_TABLE_FILE=$(realpath "$1")
[ -f "$2" ] || fail "config file '$2' does not exist"
CONFIG_FILE=$(realpath "$2")
RANGE=$3
[[ "$RANGE" =~ ^\[\ *([0-9]+)\ *,\ *([0-9]+)\ *[\]\)]$ ]] \
  || fail "device range '$RANGE' is not of the form \"[START,END)\", e.g. \"[0,8)\""
START=${BASH_REMATCH[1]}
END=${BASH_REMATCH[2]}
START=$((10#$START))
END=$((10#$END))
[ "$START" -lt "$END" ] || fail "device range '$RANGE' is empty: START ($START) must be less than END ($END)"
RUN_MODE=$4
case "$RUN_MODE" in
  train|finetune|eval|predict) ;;
  *) fail "RUN_MODE must be train, finetune, eval or predict, got '$RUN_MODE'" ;;
esac
LOCAL_NUM=$((END - START))
RANK_SIZE=${5:-$LOCAL_NUM}
[[ "$RANK_SIZE" =~ ^[0-9]+$ ]] && [ "$RANK_SIZE" -ge 1 ] || fail "RANK_SIZE must be a positive integer, got '$5'"
[ "$RANK_SIZE" -ge "$LOCAL_NUM" ] \
  || fail "RANK_SIZE ($RANK_SIZE) is smaller than the $LOCAL_NUM process(es) of range $RANGE on this node"
PREDICT_DATA=$6
if [ $# -eq 6 ] && [ "$RUN_MODE" != "predict" ]; then
  fail "PREDICT_DATA is only for RUN_MODE predict (RUN_MODE is $RUN_MODE)"
fi

# the rank table must hold RANK_SIZE devices and put each rank of this node on the device it gets here
CHECK=("$PYTHON" "$REPO_DIR/mindformers/tools/hccl_tools.py" --check_rank_table "$RANK_TABLE_FILE"
       --device_num "[$START,$END)")
if [ "$RANK_SIZE" -ne "$LOCAL_NUM" ]; then
  CHECK+=(--rank_size "$RANK_SIZE")
fi
PLAN=$("${CHECK[@]}" 2>&1) || fail "${PLAN#hccl_tools: error: }"

if [ "$DRY_RUN" -eq 0 ] && ! compgen -G "/dev/davinci[0-9]*" > /dev/null; then
  fail "rank-table launches need Ascend devices and none is present (/dev/davinci*); on CPU or GPU launch with" \
       "scripts/msrun_launcher.sh"
fi

ARGS=(--config "$CONFIG_FILE" --use_parallel True --run_mode "$RUN_MODE")
if [ -n "$PREDICT_DATA" ]; then
  ARGS+=(--predict_data "$PREDICT_DATA")
fi
PIDS=()
while read -r RANK_ID DEVICE_ID; do
  LOG_DIR="output/log/rank_$RANK_ID"
  ENVS=(RANK_TABLE_FILE="$RANK_TABLE_FILE" RANK_SIZE="$RANK_SIZE" RANK_ID="$RANK_ID" DEVICE_ID="$DEVICE_ID")
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '%q ' env "${ENVS[@]}" "$PYTHON" "$REPO_DIR/run_mindformer.py" "${ARGS[@]}"
    echo "> $LOG_DIR/worker.log 2>&1"
    continue
  fi
  mkdir -p "$LOG_DIR"
  env "${ENVS[@]}" "$PYTHON" "$REPO_DIR/run_mindformer.py" "${ARGS[@]}" > "$LOG_DIR/worker.log" 2>&1 &
  PIDS+=($!)
  echo "run_distribute.sh: rank $RANK_ID on device $DEVICE_ID: pid $!, log $LOG_DIR/worker.log"
done <<< "$PLAN"
if [ "$DRY_RUN" -eq 0 ]; then
  echo "run_distribute.sh: started ${#PIDS[@]} of $RANK_SIZE process(es) in the background; stop them with:" \
       "kill ${PIDS[*]}"
fi
