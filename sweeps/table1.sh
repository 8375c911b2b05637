#!/usr/bin/env bash
# Study "table1": the paper's Table 1 (Pang et al. 2024, GSM8K) as one command.
#   sweeps/table1.sh                      # embedded arith task, CPU sizes
#   DATASET=gsm8k MODEL_PATH=/ckpt/Llama-2-70b-chat-hf SEEDS=0,1,2 sweeps/table1.sh launcher=slurm
# Rows: M0 greedy CoT (iteration 0 of every run), SFT on gold, STaR, STaR 2x, DPO,
# RPO 2x (one iteration each, as in the paper), RPO iterations 1..T, and RPO
# iterated from the SFT model (model.path = the SFT run's checkpoint).
source "$(dirname "$0")/_lib.sh"
STUDY=table1

# 1. Baselines: one iteration each (the 2x methods: one iteration on twice the data).
irpo_multirun experiment=sweep_$STUDY method=sft,star,star_2x,dpo,rpo_2x iterations=1
# 2. IRPO: RPO for the dataset's T iterations.
irpo_multirun experiment=sweep_$STUDY method=rpo
# 3. IRPO from the SFT model of step 1, per seed (the initialisation variant; its
#    model tag "sft" makes it the report's row "rpo (init=sft)").
for seed in $(seeds); do
  sft_dir="$(irpo_run_dir $STUDY "$seed" method=sft)"
  irpo_multirun experiment=sweep_$STUDY method=rpo "seed=$seed" model.builtin=null \
    "model.path='$sft_dir/iter1/train/model'" model.name=sft
done
irpo_report $STUDY
