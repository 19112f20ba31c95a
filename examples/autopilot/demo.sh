#!/usr/bin/env bash
# Growth on autopilot in a few minutes on this machine (make autopilot-demo): the autopilot polls in the background
# (local executor); three crawls land in its inbox one after another, as a crawler would leave them. Crawl 1 (600
# pairs) becomes stage 1; crawl 2 (200) is not enough growth (600 -> 800 is x1.33 < autopilot.min_growth 1.5) and
# waits; crawl 3 (200) makes it x1.67: crawls 2 and 3 become stage 2, grown by the search. No command in between.
# On a cluster: the same config with --executor slurm (the poll becomes a recurring SLURM job); see README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DIR=${AUTOPILOT_DIR:-/tmp/growclip-autopilot}
EVAL=${EVAL_DIR:-data/offline/eval}   # the offline corpus's eval sets (make demo builds them)
test -d "$EVAL" || { echo "error: no eval sets in $EVAL; run make demo (or set EVAL_DIR)" >&2; exit 2; }
rm -rf "$DIR" && mkdir -p "$DIR/inbox" "$DIR/data"
ln -s "$(realpath "$EVAL")" "$DIR/data/eval"
ARGS=(--config configs/autopilot-demo.yaml --run-dir "$DIR/run" --executor local
      --set "data.root=$DIR/data" --set "autopilot.inbox=$DIR/inbox")
EVENTS="$DIR/run/autopilot/events.jsonl"

GROWCLIP_LOG_LEVEL=WARNING "$PY" -m jobs autopilot "${ARGS[@]}" > "$DIR/autopilot.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT

crawl() {  # NAME PAIRS SEED: img2dataset-style webdataset shards written aside, then moved in with _SUCCESS
  "$PY" -c "import sys; from data_tools.synthetic import make_img2dataset_input as m; m(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]))" \
    "$DIR/.$1" "$2" "$3"
  touch "$DIR/.$1/_SUCCESS" && mv "$DIR/.$1" "$DIR/inbox/$1"
  echo "crawl $1 ($2 pairs) landed in $DIR/inbox"
}
wait_for() {  # EVENT STAGE
  until grep -q "\"event\": \"$1\", \"stage\": $2" "$EVENTS" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { tail -20 "$DIR/autopilot.log"; exit 1; }
    sleep 2
  done
  echo "  -> $1: stage $2"
}
wait_reading() {  # NEW: until the trigger has read NEW pending pairs
  until grep -q "\"event\": \"trigger_not_reached\", \"base\": [0-9]*, \"new\": $1," "$EVENTS" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { tail -20 "$DIR/autopilot.log"; exit 1; }
    sleep 2
  done
  grep '"trigger_not_reached"' "$EVENTS" | tail -1 | "$PY" -c "import json,sys; e=json.loads(sys.stdin.read()); print(f\"  -> waiting: {e['why']}\")"
}

crawl crawl_0001 600 1
wait_for stage_finished 1
crawl crawl_0002 200 2
wait_reading 200
crawl crawl_0003 200 3
wait_for stage_finished 2
echo
"$PY" -m jobs status "$DIR/run"
echo
"$PY" -m jobs report "$DIR/run"
echo
echo "events: $EVENTS"
