#!/usr/bin/env bash
# Runs the whole study (README.md) in the background-friendly way it was run: builds the models
# if missing, then each task's sweep in turn, copying each finished task's results into
# results/<task>/ with its weight-decomposition analysis. A rerun skips finished cells and
# resumes a killed one (`bidora sweep`), so this script can be restarted at any point.
# Each finished cell's record is also saved as results/<task>/cells/<cell>.json while the
# sweep runs and restored before it starts, so a task's finished cells outlive the machine
# (run folders do not) once those files are committed.
#
#   (nohup setsid bash examples/study/run-all.sh >> runs/study/run-all.log 2>&1 &)
#
# BIDORA (default target/release/bidora), TASKS (default: every task not yet in results/),
# THREADS (default 2) and BACKEND (default ort) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIDORA="${BIDORA:-target/release/bidora}"
THREADS="${THREADS:-2}"
BACKEND="${BACKEND:-ort}"
TASKS="${TASKS:-mrpc rte stsb cola conll reuters sst2}"
mkdir -p runs/study

# A copy of the binary, so rebuilding target/ while the study runs does not change it mid-way.
mkdir -p runs/study/bin
cp "$BIDORA" runs/study/bin/bidora
BIN=runs/study/bin/bidora

if [ ! -f runs/study-models/token9/model.onnx ]; then
  python3 models/make_minilm_study.py -o runs/study-models
fi

# results/<task>/cells/<cell>.json <-> runs/study/<task>/cells/<cell>/cell.json
save_cells() {
  local saved="examples/study/results/$1/cells" f name
  for f in runs/study/"$1"/cells/*/cell.json; do
    [ -f "$f" ] || continue
    grep -q '"ok": true' "$f" || continue
    name="$(basename "$(dirname "$f")")"
    mkdir -p "$saved"
    if ! cmp -s "$f" "$saved/$name.json"; then
      cp "$f" "$saved/$name.json.tmp" && mv "$saved/$name.json.tmp" "$saved/$name.json"
    fi
  done
}
restore_cells() {
  local saved="examples/study/results/$1/cells" f dir
  for f in "$saved"/*.json; do
    [ -f "$f" ] || continue
    dir="runs/study/$1/cells/$(basename "$f" .json)"
    [ -f "$dir/cell.json" ] && continue
    mkdir -p "$dir"
    cp "$f" "$dir/cell.json"
    echo "== $1: restored $(basename "$f" .json) from $saved"
  done
}

for task in $TASKS; do
  if [ -f "examples/study/results/$task/results.md" ] && [ -z "${RERUN:-}" ]; then
    echo "== $task: results already in examples/study/results/$task (RERUN=1 to redo)"
    continue
  fi
  echo "== $task $(date -u +%FT%TZ)"
  restore_cells "$task"
  (while sleep 60; do save_cells "$task"; done) &
  saver=$!
  status=0
  "$BIN" sweep "examples/study/$task.sweep.toml" -o "runs/study/$task" \
    --backend "$BACKEND" --threads "$THREADS" || status=$?
  kill "$saver" 2>/dev/null || true
  save_cells "$task"
  if [ "$status" != 0 ]; then
    echo "== $task: sweep failed (exit $status)"
    exit "$status"
  fi
  mkdir -p "examples/study/results/$task"
  cp "runs/study/$task"/results.{md,jsonl,svg} "examples/study/results/$task/"
  # The weight-decomposition analysis needs the run folders' tensors, which do not outlive
  # the machine: write it now, with the results.
  "$BIN" analyze "runs/study/$task" -o "examples/study/results/$task" \
    || echo "== $task: analysis failed (results kept)"
  echo "== $task done $(date -u +%FT%TZ)"
done
