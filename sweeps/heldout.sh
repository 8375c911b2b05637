#!/usr/bin/env bash
# Study "heldout": train RPO on one task, evaluate after every iteration on others too.
# Does reasoning learnt on one task carry over? On the embedded task the held-out
# "task" is longer arithmetic (6-7 operations; training uses the arith defaults);
# with DATASET=<real task> it is the other real tasks.
# Needs the driver's `heldout` support (sweeps/README.md, "Driver support").
#   sweeps/heldout.sh          DATASET=gsm8k MODEL_PATH=... sweeps/heldout.sh
source "$(dirname "$0")/_lib.sh"
irpo_require heldout "evaluate on held-out tasks after every iteration"
case "$DATASET_NAME" in
  arith) HELDOUT=(+dataset@heldout.arith_long=arith heldout.arith_long.min_ops=6
                  heldout.arith_long.max_ops=7) ;;
  *) HELDOUT=()
     for other in gsm8k math arc_challenge; do
       [[ "$other" != "$DATASET_NAME" ]] && HELDOUT+=("+dataset@heldout.$other=$other")
     done ;;
esac
irpo_multirun experiment=sweep_heldout "${HELDOUT[@]}"
irpo_report heldout
