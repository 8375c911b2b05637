#!/usr/bin/env bash
# Study "iterative_dpo": T iterations of DPO (α = 0) against T iterations of RPO.
# Does iterating alone close the gap, or is the NLL term needed at every iteration?
#   sweeps/iterative_dpo.sh          DATASET=gsm8k MODEL_PATH=... sweeps/iterative_dpo.sh
source "$(dirname "$0")/_lib.sh"
irpo_multirun experiment=sweep_iterative_dpo
irpo_report iterative_dpo
