#!/usr/bin/env bash
# One working session of the cpu64 run (issue 16), started first thing from the main checkout:
# set up, freeze the code at the run's commit in ../frozen-cpu64, and run the units that have no
# published result yet, in order, in the background. run_units.sh commits each unit as it ends; a
# unit the session cannot finish leaves nothing and runs again next session (one unit takes
# 1 h 10 min to 1 h 50 min on a fast machine: docs/benchmarks.md).
#
# Only missing units are passed: a finished unit would be skipped, but its page would be rewritten
# by the frozen code and committed as if it had run again.
#
# Afterwards: regenerate the page from main (`dpaat experiment experiments/cpu64.toml
# --summarize-only --results docs/results/cpu64 --out ../frozen-cpu64/runs/experiments`), commit
# it, and `git worktree remove ../frozen-cpu64`. With root, `echo 0 >
# /proc/sys/kernel/sched_autogroup_enabled` lets a `nice -n 19` test run yield to the unit.
set -euo pipefail
FROZEN=ec7df79  # the run's one code version (docs/decisions.md, session 7)
UNITS="standard:0 dpaat:0 pgd_at:0 amat_external:0 trades:0 iaat_flip:0
       standard:1 dpaat:1 pgd_at:1 amat_external:1 trades:1 iaat_flip:1"
main=$(pwd)
results=$main/docs/results/cpu64
todo=()
for u in $UNITS; do
  [ -f "$results/units/${u%%:*}-seed${u##*:}.json" ] || todo+=("$u")
done
[ ${#todo[@]} -gt 0 ] || { echo "every cpu64 unit has its result"; exit 0; }
make setup
[ -d ../frozen-cpu64 ] || git worktree add ../frozen-cpu64 "$FROZEN"
cd ../frozen-cpu64
THREADS=2 nohup setsid experiments/run_units.sh experiments/cpu64.toml "$results" "$main" \
  "${todo[@]}" > ../cpu64-run.log 2>&1 &
echo "running ${todo[*]}; progress: ../frozen-cpu64/runs/experiments/cpu64/experiment.log"
