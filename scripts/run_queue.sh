#!/usr/bin/env bash
# Train the paper presets one after another, resuming whatever is unfinished, then evaluate
# each finished run on 600 test tasks. Safe to kill at any moment and start again: every run
# resumes from its last checkpoint (written atomically every 200 iterations).
#
#   nohup scripts/run_queue.sh ~/runs /path/to/omniglot /path/to/miniimagenet >> ~/runs/queue.log 2>&1 &
#
# Uses one process per core (--nproc). Results: <runs>/<preset>/eval_test.json.
# PADDLEFSL sets the command (default "paddlefsl"); to keep a long queue on fixed code while
# the checkout changes, point it at a snapshot: PYTHONPATH=/snapshot PADDLEFSL="python -m paddlefsl".
set -u
RUNS=${1:-$HOME/runs}
OMNIGLOT=${2:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/omniglot}
MINI=${3:-$HOME/data/miniimagenet}
NPROC=${NPROC:-$(nproc)}
read -r -a PADDLEFSL <<< "${PADDLEFSL:-paddlefsl}"
PRESETS=${PRESETS:-"maml-omniglot-5w1s anil-omniglot-5w1s maml-omniglot-5w5s anil-omniglot-5w5s
  anil-miniimagenet-5w1s maml-miniimagenet-5w1s anil-miniimagenet-5w5s maml-miniimagenet-5w5s"}
mkdir -p "$RUNS"
for preset in $PRESETS; do
  out="$RUNS/$preset"
  case $preset in *omniglot*) root=$OMNIGLOT ;; *) root=$MINI ;; esac
  [ -f "$out/eval_test.json" ] && { echo "$(date -Is) $preset: done"; continue; }
  if [ -f "$out/checkpoints/last.json" ]; then
    resume=(--resume)
  else
    resume=(--preset "$preset" --eval-every 1000 --val-tasks 200 --checkpoint-every 200)
  fi
  echo "$(date -Is) $preset: training (${resume[0]})"
  "${PADDLEFSL[@]}" train "${resume[@]}" --output "$out" --data-root "$root" --nproc "$NPROC" \
    --no-progress
  rc=$?
  [ $rc -eq 0 ] || { echo "$(date -Is) $preset: train exited with $rc"; exit $rc; }
  "${PADDLEFSL[@]}" eval --checkpoint "$out" --data-root "$root" --no-progress
  rc=$?
  [ $rc -eq 0 ] || { echo "$(date -Is) $preset: eval exited with $rc"; exit $rc; }
done
