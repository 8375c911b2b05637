#!/usr/bin/env bash
# Study "beta": β ∈ {0.05, 0.1, 0.5, 1.0}, with (α = 1) and without (α = 0) the NLL term.
# Is the result sensitive to β, and does the NLL gain hold at every β?
#   sweeps/beta.sh          DATASET=gsm8k MODEL_PATH=... sweeps/beta.sh
source "$(dirname "$0")/_lib.sh"
irpo_multirun experiment=sweep_beta
irpo_report beta_alpha
