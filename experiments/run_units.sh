#!/usr/bin/env bash
# Run an experiment unit by unit and commit each finished unit's published result, so that a run
# of many hours spans sessions whose run directories are gone (issue 16).
#
#   experiments/run_units.sh CONFIG RESULTS_DIR COMMIT_REPO UNIT:SEED...
#   e.g. from a frozen checkout (one code version for the whole run):
#   git worktree add ../frozen-cpu64 <commit>; cd ../frozen-cpu64
#   experiments/run_units.sh experiments/cpu64.toml /work/main/docs/results/cpu64 /work/main \
#       standard:0 standard:1 dpaat:0 pgd_at:0
#
# THREADS (default 1) sets torch's threads per unit: 2 on the 2-core machine, so that a unit
# (training and evaluation) ends inside one session; a unit's result records its thread count.
# RESULTS_DIR/units/*.json that are valid for the same settings are skipped (`--results`), so the
# same command continues an interrupted run. Each unit is committed alone (`git commit -- path`),
# whatever else is staged in COMMIT_REPO.
set -euo pipefail
config=$1 results=$2 repo=$3
shift 3
python=${PYTHON:-$repo/.venv/bin/python}
for unit in "$@"; do
  name=${unit%%:*} seed=${unit##*:}
  PYTHONPATH=$PWD "$python" -c "from app.cli import main; main()" experiment "$config" \
    --only "$name" --seed "$seed" --results "$results" --threads "${THREADS:-1}" || echo "unit $unit failed"
  file=$results/units/$name-seed$seed.json
  if [ -f "$file" ] && [ -n "$(git -C "$repo" status --porcelain -- "$results")" ]; then
    for _ in 1 2 3 4 5; do  # the index may be locked by another git command for a moment
      git -C "$repo" add -- "$results" && \
        git -C "$repo" commit -q -m "$(basename "$config" .toml): $name seed $seed finished" \
          -- "$results" && break
      sleep 5
    done
  fi
done
