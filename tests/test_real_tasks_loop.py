"""One short iteration of the loop on each real benchmark with the built-in model.

Accuracy near zero is expected: the point is the plumbing on real records
(prompts, sampling, labelling, pairs, training, evaluation). The gold response
is added to the winners so that pairs exist even when no sample is correct.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, run_main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no benchmark data at {SHARED_DATA}")]

SMALL = ["iterations=1", "samples_per_prompt=2", "pairs_per_prompt=1", "temperature=[1.0]",
         "dataset.train_size=6", "dataset.valid_size=4", "dataset.test_size=6",
         "dataset.max_new_tokens=24", "dataset.add_gold_to_winners=true", "eval.maj_k=2",
         "trainer.batch_size=4", "tracking=none"]


@pytest.mark.parametrize("dataset, prompt_start", [
    ("gsm8k", "Your task is to answer the question below."),
    ("math", "Your task is to answer the question below."),
    ("arc_challenge", "Your task is to answer the question below."),
])
def test_one_iteration_on_real_records(tmp_path, dataset, prompt_start):
    run_main([f"dataset={dataset}", *SMALL], tmp_path)
    (run,) = list((tmp_path / "runs").iterdir())
    samples = [json.loads(line) for line in open(run / "iter1/sample/samples.jsonl")]
    assert len(samples) == 6 and all(len(r["samples"]) == 2 for r in samples)
    assert all(r["prompt"].startswith(prompt_start) for r in samples)
    labelled = [json.loads(line) for line in open(run / "iter1/label/labelled.jsonl")]
    pairs = [json.loads(line) for line in open(run / "iter1/data/train.jsonl")]
    gold = {r["id"]: r["gold_cot"] for r in labelled}
    assert pairs, "the gold response among the winners must give pairs"
    for p in pairs:
        wrong = [s["text"] for r in labelled if r["id"] == p["id"] for s in r["samples"]
                 if not s["correct"]]
        assert p["rejected"] in wrong
        assert p["chosen"] == gold[p["id"]] or p["chosen"] != p["rejected"]
    assert (run / "iter1/train/model/model.safetensors").exists()
    done = json.loads((run / "iter1/eval/DONE").read_text())
    preds = [json.loads(line) for line in open(run / "iter1/eval/predictions.jsonl")]
    assert len(preds) == 6 and 0.0 <= done["test/accuracy"] <= 1.0
    assert done["test/accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 6)
