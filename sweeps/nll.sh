#!/usr/bin/env bash
# Study "nll": α ∈ {0, 0.25, 0.5, 1, 2} (α = 0 is DPO) at β = 0.1, T iterations each.
# Does the NLL term help, and how much of it? (paper §3.1 ablation, reviewers' α curve)
#   sweeps/nll.sh          DATASET=gsm8k MODEL_PATH=... sweeps/nll.sh
source "$(dirname "$0")/_lib.sh"
irpo_multirun experiment=sweep_nll
irpo_report beta_alpha
