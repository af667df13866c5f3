#!/usr/bin/env bash
# Data-parallel throughput (BENCHMARKS.md, "Data-parallel training"): the quickstart's
# MiniLM BiDoRA run, shortened, on 1 process (1 and 2 engine threads) and on 2 MPI ranks of
# 1 thread each; examples/s of the steps (evaluation excluded) and the all-reduce's share.
# Usage: tests/benches/distributed.sh [BIDORA_BINARY] (default target/debug/bidora, built
# with --features mpi). Needs mpirun (Open MPI) and python3. STEPS (30), BATCH (16) and
# BACKEND (tract; ort) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${1:-target/debug/bidora}"
COMPILE="${COMPILE:-target/debug/bidora-compile}"
STEPS="${STEPS:-30}"
BATCH="${BATCH:-16}"
BACKEND="${BACKEND:-tract}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$COMPILE" models/minilm-sst2/model.onnx --target query,value --task seq-cls --train-head \
  -o "$OUT/art" --force >/dev/null
SETS=(--set "steps=$STEPS" --set "batch_size=$BATCH" --set retrain_steps=0 --set eval_every=0 --set checkpoint_every=0)
run() { # name, then the command's prefix
  local name="$1"; shift
  "$@" "$BIN" train "$OUT/art" --config examples/sst2/train.toml -o "$OUT/$name" \
    "${SETS[@]}" --backend "$BACKEND" "${EXTRA[@]}" >/dev/null 2>"$OUT/$name.err" || { cat "$OUT/$name.err"; exit 1; }
  python3 - "$OUT/$name/metrics.jsonl" "$name" "$BATCH" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"step"' in l]
steps = steps[2:]  # the first steps plan every program shape: not steady state
total = sum(s["secs"]["total"] for s in steps)
red = sum(s["secs"].get("all_reduce", 0.0) for s in steps)
ex = int(sys.argv[3]) * len(steps)
print(f"{sys.argv[2]:>22}: {ex / total:6.2f} examples/s over {len(steps)} steps, "
      f"{total / len(steps):.3f} s/step, all-reduce {100 * red / total:.2f} % of the step")
PY
}
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2)
EXTRA=(--threads 1); run "1 process, 1 thread"
EXTRA=(--threads 2); run "1 process, 2 threads"
EXTRA=(--threads 1 --distributed mpi); run "2 ranks x 1 thread" "${MPI[@]}"
