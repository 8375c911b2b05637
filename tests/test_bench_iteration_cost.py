"""The iteration-cost benchmark's logic without its timings (benchmarks/iteration_cost.py).

The scale-factor overrides are composed by the real Hydra app (they must double what
the current defaults say); the whole script then runs with ``python -m irpo.main``
replaced by a fake that writes DONE markers whose times are known functions of the
work, so the medians, ratios and per-unit costs it reports can be checked exactly.

    .venv/bin/python -m pytest tests/test_bench_iteration_cost.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import iteration_cost as ic

TOKENS_PER_SAMPLE = 20
SLOW_REPEAT = 1.5  # repeat 1 runs this much slower, as if the machine were busier


@pytest.fixture(scope="module")
def defaults() -> dict:
    return ic.compose_defaults([])


def test_scale_overrides_double_the_composed_defaults(defaults):
    p, n = defaults["dataset"]["train_size"], defaults["samples_per_prompt"]
    configs = ic.scale_configs(defaults, [2])
    assert list(configs) == ["1x", "2x_prompts", "2x_samples"]
    assert configs["1x"]["overrides"] == []
    # What Hydra composes from the overrides, not just what the builder says.
    doubled_p = ic.compose_defaults(configs["2x_prompts"]["overrides"])
    assert (doubled_p["dataset"]["train_size"], doubled_p["samples_per_prompt"]) == (2 * p, n)
    doubled_n = ic.compose_defaults(configs["2x_samples"]["overrides"])
    assert (doubled_n["dataset"]["train_size"], doubled_n["samples_per_prompt"]) == (p, 2 * n)
    assert doubled_n["pairs_per_prompt"] == defaults["pairs_per_prompt"]
    assert configs["2x_samples"]["prompts"] * configs["2x_samples"]["samples_per_prompt"] == 2 * p * n
    with pytest.raises(SystemExit, match="scale factors"):
        ic.scale_configs(defaults, [1])


def test_scaled_keys_replace_the_users_overrides():
    extra = ["dataset.train_size=16", "samples_per_prompt=2", "pairs_per_prompt=1"]
    assert ic.merge_overrides(extra, ["dataset.train_size=32"]) == [
        "samples_per_prompt=2", "pairs_per_prompt=1", "dataset.train_size=32"]
    assert ic.merge_overrides(extra, []) == extra


def test_schedule_interleaves_and_keeps_one_default_evaluation():
    plan = ic.schedule(["1x", "2x_prompts", "2x_samples"], repeats=2)
    assert [(p["config"], p["repeat"]) for p in plan] == [
        ("1x", 0), ("2x_prompts", 0), ("2x_samples", 0), ("1x", 1), ("2x_prompts", 1),
        ("2x_samples", 1)]
    assert [p["default_eval"] for p in plan] == [True] + [False] * 5
    assert all(("eval.maj_k=0" in p["overrides"]) != p["default_eval"] for p in plan)
    names = [o for p in plan for o in p["overrides"] if o.startswith("run_name=")]
    assert len(set(names)) == len(plan)
    assert all({"iterations=1", "tracking=none"} <= set(p["overrides"]) for p in plan)


def _fake_main(defaults: dict, real_run):
    """Stand-in for ``python -m irpo.main``: writes the DONE markers of one iteration."""
    def fake(cmd, **kwargs):
        if "irpo.main" not in cmd or "--cfg" in cmd:
            return real_run(cmd, **kwargs)
        ov = dict(a.split("=", 1) for a in cmd if "=" in a)
        p = int(ov.get("dataset.train_size", defaults["dataset"]["train_size"]))
        n = int(ov.get("samples_per_prompt", defaults["samples_per_prompt"]))
        k = defaults["pairs_per_prompt"]
        slow = SLOW_REPEAT if ov["run_name"].endswith("-r1") else 1.0
        eval_s = 2.0 if ov.get("eval.maj_k") == "0" else 9.0
        run = Path(ov["output_root"]) / "runs" / f"{ov['run_name']}-0123456789"
        done = {"iter0/eval": {"wall_s": eval_s * slow, "test/accuracy": 0.3},
                "iter1/sample": {"wall_s": 1e-3 * TOKENS_PER_SAMPLE * p * n * slow,
                                 "tokens_sampled": TOKENS_PER_SAMPLE * p * n},
                "iter1/label": {"wall_s": 1e-5 * p * n * slow, "frac_correct": 0.2},
                "iter1/data": {"wall_s": 1e-4 * p * slow, "data_examples": p * k},
                "iter1/train": {"wall_s": 0.01 * p * k * slow},
                "iter1/eval": {"wall_s": eval_s * slow, "test/accuracy": 0.31}}
        for stage, info in done.items():
            (run / stage).mkdir(parents=True)
            (run / stage / "DONE").write_text(json.dumps(info))
        (run / "summary.md").write_text("| table |\n\npeak RSS: 321 MiB\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return fake


def test_summary_from_fake_done_markers(defaults, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_main(defaults, subprocess.run))
    out = tmp_path / "iteration_cost"
    # A user override of a scaled key sets the 1x value; the fake, like Hydra, takes the last value.
    monkeypatch.setattr(sys, "argv", ["iteration_cost.py", "--out", str(out), "--allow-m0-build",
                                      "dataset.train_size=24"])
    ic.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["runs"]) == 6 and result["machine"]["load_avg_end"]
    p, n, k = 24, defaults["samples_per_prompt"], defaults["pairs_per_prompt"]
    table = result["summary"]["configs"]
    mid = (1 + SLOW_REPEAT) / 2  # median of two repeats
    base = table["1x"]
    assert base["tokens"] == TOKENS_PER_SAMPLE * p * n and base["pairs"] == p * k
    assert base["sample_s"] == pytest.approx(1e-3 * TOKENS_PER_SAMPLE * p * n * mid)
    assert base["train_s"] == pytest.approx(0.01 * p * k * mid)
    assert base["eval_s"] == pytest.approx(2.0 * SLOW_REPEAT)  # the maj@k run is left out
    assert base["us_per_token"] == pytest.approx(1e3 * mid)
    assert base["ms_per_pair"] == pytest.approx(10 * mid)
    both = table["2x_prompts"]["ratio"]
    assert both["samples"] == both["tokens"] == both["pairs"] == 2
    assert both["sample_s"] == pytest.approx(2) and both["train_s"] == pytest.approx(2)
    assert both["us_per_token"] == pytest.approx(1) and both["ms_per_pair"] == pytest.approx(1)
    fit = table["2x_prompts"]["affine"]  # the fake stages are linear with no fixed part
    assert fit["sample_per_token"]["fixed_s"] == pytest.approx(0, abs=1e-9)
    assert fit["sample_per_token"]["marginal"] == pytest.approx(1e3 * mid)
    assert fit["train_per_pair"]["marginal"] == pytest.approx(10 * mid)
    assert table["2x_samples"]["affine"]["train_per_pair"] is None  # pairs did not grow
    more_n = table["2x_samples"]["ratio"]
    assert (more_n["tokens"], more_n["pairs"]) == (2, 1)
    assert more_n["sample_s"] == pytest.approx(2) and more_n["train_s"] == pytest.approx(1)
    # 1x has one greedy-eval run (repeat 1, slow), 2x_samples two (median of fast and slow).
    assert more_n["eval_s"] == pytest.approx((1 + SLOW_REPEAT) / 2 / SLOW_REPEAT)
    default = result["summary"]["default_run"]
    assert default["iter0_eval_s"] == default["eval_s"] == 9.0
    assert default["stages_s"] == pytest.approx(18 + 1e-3 * TOKENS_PER_SAMPLE * p * n
                                                + 1e-5 * p * n + 1e-4 * p + 0.01 * p * k)
    md = out.with_suffix(".md").read_text()
    assert f"train_size={p} prompts" in md and "| 2x_samples |" in md
    assert md.count("\n| 2x_prompts | 2.00 | 2.00 | 2.00 | 1.00 | 2.00 | 2.00 | 1.00 |") == 1
    assert "| 1x (maj@k eval) | 0 |" in md
    # Re-rendering from the JSON alone gives the same report.
    out.with_suffix(".md").unlink()
    monkeypatch.setattr(sys, "argv", ["iteration_cost.py", "--out", str(out),
                                      "--from-json", str(out.with_suffix(".json"))])
    ic.main()
    assert out.with_suffix(".md").read_text() == md


def test_budget_stops_at_a_repeat_boundary(defaults, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_main(defaults, subprocess.run))
    out = tmp_path / "iteration_cost"
    monkeypatch.setattr(sys, "argv", ["iteration_cost.py", "--out", str(out), "--allow-m0-build",
                                      "--repeats", "3", "--budget-min", "1e-9"])
    ic.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["config"] for r in result["runs"]] == ["1x", "2x_prompts", "2x_samples"]
    assert result["repeats"] == 1
    table = result["summary"]["configs"]
    assert table["1x"]["eval_s"] is None  # its only run evaluated with maj@k
    assert table["2x_samples"]["ratio"]["tokens"] == 2
