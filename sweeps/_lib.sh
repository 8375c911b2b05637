# Shared by the study scripts in sweeps/ (source it; do not run it).
#
# Switches (environment variables), the same for every study:
#   DATASET=gsm8k        a real task at the paper's sizes (default: the embedded arith task)
#   MODEL=<option>       a conf/model option for M0 (default: the config's default model)
#   MODEL_PATH=<dir>     M0 from a Hugging Face checkpoint directory instead
#   SEEDS=0,1,2          seeds of every point (default: the config's seed, 0)
#   PYTHON=<python>      interpreter (default: .venv/bin/python, else python3)
#   IRPO_OUTPUT_ROOT     where runs, the MLflow store and reports go (default: outputs)
#   IRPO_SWEEP_DRY_RUN=1 print the Hydra command lines instead of running them
# Arguments of a study script are passed to every Hydra command, e.g.
#   sweeps/table1.sh launcher=slurm sampler=vllm
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DRY="${IRPO_SWEEP_DRY_RUN:-}"
DATASET_NAME="${DATASET:-arith}"
SEED_LIST="${SEEDS:-0}"

# Overrides every command of a study gets: the switches above, then the script's arguments.
COMMON=()
[[ -n "${DATASET:-}" ]] && COMMON+=("dataset=$DATASET")
[[ -n "${MODEL:-}" ]] && COMMON+=("model=$MODEL")
[[ -n "${MODEL_PATH:-}" ]] && COMMON+=("model.builtin=null" "model.path='$MODEL_PATH'")
[[ -n "${SEEDS:-}" ]] && COMMON+=("seed=$SEEDS")
EXTRA=("$@")

# irpo_multirun OVERRIDE...: one Hydra multirun (`python -m irpo.main -m`) of this study.
# Order matters where two overrides set one key (the last wins): the switches, then the
# step's own overrides (a step's seed=1 beats SEEDS, its model.path beats MODEL_PATH),
# then the script's arguments.
irpo_multirun() {
  local cmd=("$PYTHON" -m irpo.main -m "${COMMON[@]}" "$@" "${EXTRA[@]}")
  if [[ -n "$DRY" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
  fi
}

# irpo_run_dir STUDY SEED FILTER...: run directory of the newest finished run of this
# study, dataset and seed matching the filters (from MLflow; see irpo/report/lookup.py).
irpo_run_dir() {
  local study="$1" seed="$2"
  shift 2
  if [[ -n "$DRY" ]]; then
    echo "DRY-RUN/$study-$DATASET_NAME-$(IFS=-; echo "${*//=/_}")-seed$seed"
  else
    "$PYTHON" -m irpo.report.lookup --experiment "$study" --filter "dataset=$DATASET_NAME" \
      --filter "seed=$seed" "${@/#/--filter=}"
  fi
}

# irpo_require KEY WHAT: stop (before any run) unless the config schema has KEY, a
# driver feature this study needs (see sweeps/README.md, "Driver support").
irpo_require() {
  [[ -n "$DRY" ]] && return 0
  local rc=0
  "$PYTHON" -c "import dataclasses, sys; from irpo.config import Config; \
sys.exit(0 if '$1' in {f.name for f in dataclasses.fields(Config)} else 10)" || rc=$?
  if [[ $rc == 10 ]]; then
    echo "error: this study needs driver support that is not there yet: $2" >&2
    echo "       (config key '$1'; see sweeps/README.md, 'Driver support')" >&2
    exit 3
  elif [[ $rc != 0 ]]; then
    echo "error: $PYTHON cannot import irpo (set PYTHON, or run 'make venv')" >&2
    exit 3
  fi
}

# irpo_report STUDY: the study's report (tables, plots, HTML) for this dataset.
irpo_report() {
  local out="${IRPO_OUTPUT_ROOT:-outputs}/reports/$1-$DATASET_NAME"
  if [[ -n "$DRY" ]]; then
    echo "# report: $PYTHON -m irpo.report --experiment $1 --filter dataset=$DATASET_NAME --out $out"
  else
    "$PYTHON" -m irpo.report --experiment "$1" --filter "dataset=$DATASET_NAME" --out "$out"
  fi
}

# The seeds as a word list, for studies that loop over them.
seeds() { echo "${SEED_LIST//,/ }"; }
