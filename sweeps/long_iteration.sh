#!/usr/bin/env bash
# Study "long_iteration": T iterations of RPO against ONE iteration with T epochs, about
# the same number of training steps (the report's cost table shows train steps).
# Is it the fresh samples from the improved model, or just more training?
#   sweeps/long_iteration.sh          DATASET=gsm8k MODEL_PATH=... sweeps/long_iteration.sh
source "$(dirname "$0")/_lib.sh"
irpo_multirun experiment=sweep_long_iteration
irpo_multirun experiment=sweep_long_iteration iterations=1 'trainer.epochs=${dataset.iterations}'
irpo_report iterations
