#!/usr/bin/env bash
# Train the paper presets in stages, resuming whatever is unfinished, and evaluate the
# best-on-validation checkpoint of every stage on 600 test tasks. Safe to kill at any moment
# and start again: every run resumes from its last checkpoint (written atomically every 200
# iterations), and a finished stage is skipped.
#
#   nohup scripts/run_queue.sh ~/runs /path/to/omniglot /path/to/miniimagenet >> ~/runs/queue.log 2>&1 &
#
# PLAN lists "preset@iterations" stages in order: a short first stage gives every preset a
# measured number early; a later stage of the same preset continues the same run.
# Results: <runs>/<preset>/evals/<iterations>/eval_test.json.
# NEW_RUN_ARGS adds options to the command that starts a run (not to a resume), e.g.
# NEW_RUN_ARGS="--init-from zoo/maml-omniglot-5w5s --seed 1" to continue a committed
# stage's weights on a machine that lost the run folder (docs/cli.md, --init-from).
# NPROC sets processes per run (default: one per core). PADDLEFSL sets the command (default
# "paddlefsl"); to keep a long queue on fixed code while the checkout changes, point it at a
# snapshot: PYTHONPATH=/snapshot PADDLEFSL="python -m paddlefsl".
# Stopping: SIGTERM or SIGINT to this script (its pid is the first line it logs) is passed
# on to the running train or eval, which checkpoints and exits; the queue then stops too.
# Killing the train process alone leaves the queue to notice its exit code and stop.
set -u
child=""
stopping=""
on_signal() {
  stopping=$1
  echo "$(date -Is) queue: SIG$1; stopping ${child:+the running command (pid $child) and }the queue"
  # TERM either way: a background command of a script ignores SIGINT unless it sets a handler.
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
# Runs a command in the background so that a signal reaches this shell at once; `wait`
# returns early when one arrives, so it is repeated until the command has really exited.
run() {
  "$@" &
  child=$!
  local status
  while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=""
  return "$status"
}
# Exits with 128 + the signal number once a stop was asked for (between commands).
stop_if_asked() {
  [ -z "$stopping" ] || { echo "$(date -Is) queue: stopped"; exit $((128 + $(kill -l "$stopping"))); }
}
RUNS=${1:-$HOME/runs}
OMNIGLOT=${2:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/omniglot}
MINI=${3:-$HOME/data/miniimagenet}
NPROC=${NPROC:-$(nproc)}
read -r -a PADDLEFSL <<< "${PADDLEFSL:-paddlefsl}"
PLAN=${PLAN:-"anil-omniglot-5w1s@20000 anil-omniglot-5w5s@10000 maml-omniglot-5w5s@10000
  maml-omniglot-5w1s@60000 anil-omniglot-5w1s@60000 maml-omniglot-5w5s@60000
  anil-omniglot-5w5s@60000 anil-miniimagenet-5w1s@60000 maml-miniimagenet-5w1s@60000
  anil-miniimagenet-5w5s@60000 maml-miniimagenet-5w5s@60000"}
mkdir -p "$RUNS"
echo "$(date -Is) queue: pid $$ (stop with: kill $$); plan: $(echo $PLAN)"
for stage in $PLAN; do
  preset=${stage%@*}
  iterations=${stage#*@}
  out="$RUNS/$preset"
  evals="$out/evals/$iterations"
  case $preset in *omniglot*) root=$OMNIGLOT ;; *) root=$MINI ;; esac
  [ -f "$evals/eval_test.json" ] && { echo "$(date -Is) $stage: done"; continue; }
  if [ -f "$out/checkpoints/last.json" ]; then
    start=(--resume)
  else
    read -r -a extra <<< "${NEW_RUN_ARGS:-}"
    start=(--preset "$preset" --eval-every 1000 --val-tasks 200 --checkpoint-every 200 "${extra[@]}")
  fi
  echo "$(date -Is) $stage: training (${start[0]})"
  # A crashed process (exit 1 or a signal) resumes from the last checkpoint, a few times;
  # usage errors (2), a non-finite loss and interruptions (128+) stop the queue.
  tries=0
  while :; do
    stop_if_asked
    run "${PADDLEFSL[@]}" train "${start[@]}" --iterations "$iterations" --output "$out" \
      --data-root "$root" --nproc "$NPROC" --no-progress
    rc=$?
    [ -n "$stopping" ] && [ $rc -lt 128 ] && rc=$((128 + $(kill -l "$stopping")))
    if [ $rc -eq 0 ] || [ $rc -eq 2 ] || [ $rc -ge 128 ] || [ $tries -ge "${RETRIES:-3}" ] \
        || grep -q '"event": "non_finite"' "$out/metrics.jsonl" 2>/dev/null; then
      break
    fi
    tries=$((tries + 1))
    start=(--resume)
    echo "$(date -Is) $stage: train exited with $rc; resuming (retry $tries)"
  done
  [ $rc -eq 0 ] || { echo "$(date -Is) $stage: train exited with $rc"; exit $rc; }
  mkdir -p "$evals"
  stop_if_asked
  run "${PADDLEFSL[@]}" eval --checkpoint "$out" --data-root "$root" --output "$evals" --no-progress
  rc=$?
  stop_if_asked
  [ $rc -eq 0 ] || { echo "$(date -Is) $stage: eval exited with $rc"; exit $rc; }
  echo "$(date -Is) $stage: evaluated -> $evals/eval_test.json"
done
