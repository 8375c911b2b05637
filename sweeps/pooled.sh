#!/usr/bin/env bash
# Study "pooled": DPO, and SFT on the winners (method star: NLL on chosen responses),
# each trained ONCE from M0 on the pooled training data of all T iterations of an RPO
# run. Same data as IRPO, no iteration: is it the data or the iterating?
# Needs the driver option pool_from (sweeps/README.md, "Driver support").
#   sweeps/pooled.sh          DATASET=gsm8k MODEL_PATH=... sweeps/pooled.sh
source "$(dirname "$0")/_lib.sh"
STUDY=pooled
irpo_require pool_from "train on the pooled data of another run's iterations"
# 1. The RPO run whose iterations provide the data (T iterations).
irpo_multirun experiment=sweep_$STUDY method=rpo
# 2. One iteration of DPO and of SFT-on-winners on the pool of step 1's run, per seed.
for seed in $(seeds); do
  rpo_dir="$(irpo_run_dir $STUDY "$seed" method=rpo)"
  irpo_multirun experiment=sweep_$STUDY method=dpo,star iterations=1 "seed=$seed" \
    "pool_from='$rpo_dir'"
done
irpo_report $STUDY
