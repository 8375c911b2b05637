#!/usr/bin/env bash
# Study "double_data": T iterations of RPO against one iteration on twice the data
# (rpo_2x). Compare rpo_2x with rpo at t = 2, which has seen as much generated data.
#   sweeps/double_data.sh          DATASET=gsm8k MODEL_PATH=... sweeps/double_data.sh
source "$(dirname "$0")/_lib.sh"
irpo_multirun experiment=sweep_double_data
irpo_report iterations
