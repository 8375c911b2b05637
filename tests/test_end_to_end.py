"""The loop for real: a reduced default run, the user's sweep command, and the
errors a user sees (kills, resumes and outages: test_faults.py).

Each test runs ``python -m irpo.main`` in a subprocess on the built-in model
(the shipped file, irpo/assets/tiny).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import run_main

pytestmark = pytest.mark.slow
SMOKE = ["experiment=smoke"]
STAGES = ["iter0/eval", "iter1/sample", "iter1/label", "iter1/data", "iter1/train", "iter1/eval"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").iterdir() if p.is_dir())


def mlflow_runs(root: Path) -> list[dict]:
    """Runs in the sqlite store, with their tags, params and latest metrics."""
    con = sqlite3.connect(root / "mlflow.db")
    out = []
    for (run_id, status) in con.execute("select run_uuid, status from runs"):
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)))
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)))
        metrics = {}
        for key, value, step in con.execute(
                "select key, value, step from metrics where run_uuid=? order by step", (run_id,)):
            metrics.setdefault(key, {})[step] = value
        out.append({"status": status, "tags": tags, "params": params, "metrics": metrics})
    return out


def test_reduced_default_run(tmp_path):
    proc = run_main(SMOKE, tmp_path)
    (run,) = run_dirs(tmp_path)
    for stage in STAGES:
        assert (run / stage / "DONE").exists(), stage
    samples = [json.loads(line) for line in open(run / "iter1/sample/samples.jsonl")]
    assert len(samples) == 48 and all(len(r["samples"]) == 4 for r in samples)
    labelled = [json.loads(line) for line in open(run / "iter1/label/labelled.jsonl")]
    assert all(isinstance(s["correct"], bool) for r in labelled for s in r["samples"])
    pairs = [json.loads(line) for line in open(run / "iter1/data/train.jsonl")]
    assert pairs and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    model = run / "iter1/train/model"
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()
    assert (model / "tokenizer.json").exists()
    preds = [json.loads(line) for line in open(run / "iter1/eval/predictions.jsonl")]
    assert len(preds) == 32
    acc = json.loads((run / "iter1/eval/DONE").read_text())["test/accuracy"]
    assert acc == pytest.approx(sum(p["correct"] for p in preds) / 32)
    assert "| iter |" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    (mr,) = mlflow_runs(tmp_path)
    assert mr["status"] == "FINISHED"
    assert mr["tags"]["method"] == "rpo" and mr["tags"]["dataset"] == "arith"
    assert mr["tags"]["beta"] == "0.1" and mr["tags"]["git_commit"]
    assert mr["params"]["method.name"] == "rpo" and mr["params"]["samples_per_prompt"] == "4"
    assert set(mr["metrics"]["test/accuracy"]) == {0, 1}  # step = iteration
    assert mr["metrics"]["test/accuracy"][1] == pytest.approx(acc)
    steps = json.loads((run / "iter1/train/DONE").read_text())["steps"]
    for key in ("train/loss", "train/dpo", "train/nll", "logps/chosen", "logps/rejected",
                "rewards/accuracy", "rewards/margin"):
        assert sorted(mr["metrics"][key]) == list(range(1, steps + 1)), key


def test_changed_config_gets_its_own_run_dir(tmp_path):
    run_main(SMOKE + ["tracking=none", "iterations=1"], tmp_path)
    proc = run_main(SMOKE + ["tracking=none", "beta=0.5"], tmp_path)
    assert len(run_dirs(tmp_path)) == 2
    assert "iteration 0 eval: starting" in proc.log and "skipped" not in proc.log


def test_users_sweep_command(tmp_path):
    """python -m irpo.main -m method=rpo,dpo beta=0.05,0.1,0.5 (small sizes): 6 runs."""
    run_main(["-m", "method=rpo,dpo", "beta=0.05,0.1,0.5"] + SMOKE, tmp_path, timeout=1800)
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 6 and all(r["status"] == "FINISHED" for r in runs)
    got = sorted((r["tags"]["method"], float(r["tags"]["beta"])) for r in runs)
    assert got == sorted((m, b) for m in ("rpo", "dpo") for b in (0.05, 0.1, 0.5))
    for r in runs:
        assert float(r["params"]["alpha"]) == (0.0 if r["tags"]["method"] == "dpo" else 16.0)  # arith default
        assert set(r["metrics"]["test/accuracy"]) == {0, 1}
    assert len(run_dirs(tmp_path)) == 6


def test_contradictory_config_fails_before_running(tmp_path):
    proc = run_main(["method=dpo", "alpha=0.5"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "method=dpo is DPO without the NLL term but alpha=0.5" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_unavailable_device_fails_before_running(tmp_path):
    proc = run_main(SMOKE + ["trainer.device=cuda"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "trainer.device='cuda': this machine has no CUDA GPU" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoint_is_named(tmp_path):
    proc = run_main(SMOKE + ["tracking=none", "model.builtin=null", f"model.path={tmp_path}/nope"],
                    tmp_path, check=False)
    assert proc.returncode != 0
    assert f"model.path={tmp_path}/nope" in proc.stderr


def test_zero_pairs_names_the_stage(tmp_path):
    """One-token responses cannot hold "Final answer: N", so every sample is wrong, and
    without the gold CoT as a winner no prompt has a winner: zero pairs. (One sample per
    prompt would do too, but validate refuses samples_per_prompt=1 for a pairs method.)"""
    proc = run_main(SMOKE + ["tracking=none", "dataset.max_new_tokens=1",
                             "dataset.add_gold_to_winners=false"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "iteration 1, stage 'data'" in proc.stderr
    assert "48 prompts: 0 had only correct samples" in proc.stderr  # NoTrainingData counts
    assert "48 had only incorrect samples" in proc.stderr  # smoke: train_size=48
    (run,) = run_dirs(tmp_path)
    assert (run / "iter1/label/DONE").exists()  # finished stages are kept
