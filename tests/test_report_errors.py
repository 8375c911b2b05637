"""irpo.report.errors: MATH by level/subject, checker agreement, spot-check export.

Run directories are written here the way the driver writes them (config.yaml, iter<t>/eval
with predictions.jsonl and DONE), with responses chosen so that every count is known by
hand. The checker's verdicts are the real task's; the MATH levels and subjects expected
are read from the data files directly, not through the task.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from omegaconf import OmegaConf

from irpo.report.errors import (
    agreement_table,
    analyse_run,
    boxed_rule,
    breakdown_table,
    last_letter_rule,
    last_number_rule,
    write_spot_check,
)
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.tasks.common import HubTaskConfig


def test_hand_written_rules():
    assert last_number_rule("4 * 3 = 12. 12 + 2 = 14. Final answer: 14", "14")
    assert last_number_rule("So she pays $1,234.", "1234") and last_number_rule("x = -3", "-3")
    assert not last_number_rule("Final answer: 14\nCheck: 15", "14")  # the last number counts
    assert not last_number_rule("no numbers", "3") and last_number_rule("it is 2.50", "2.5")
    assert last_letter_rule("(A) is wrong, so Final answer: (C)", "C")
    assert not last_letter_rule("Final answer: (C). Not (B)", "C") and not last_letter_rule("C", "C")
    assert boxed_rule(r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}")
    assert boxed_rule(r"\boxed{\dfrac{1}{2}}", r"\frac12".replace("12", "{1}{2}"))
    assert boxed_rule(r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})")
    assert not boxed_rule(r"\boxed{0.5}", r"\frac{1}{2}")  # strict: equal values, other spelling
    assert not boxed_rule(r"\boxed{2} then \boxed{3}", "2") and not boxed_rule(r"\boxed{2", "2")


def write_run(root: Path, dataset: dict, preds: dict[int, list[dict]]) -> Path:
    root.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"dataset": dataset, "method": {"name": "rpo"}}),
                   root / "config.yaml")
    for t, records in preds.items():
        folder = root / f"iter{t}" / "eval"
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "DONE").write_text(json.dumps({"test/accuracy": 0.0}))
    return root


ARITH = ArithConfig(train_size=4, valid_size=4, test_size=6)


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    task = ArithTask(ARITH)
    tests = task.load_split("test")
    golds = [int(e.gold_answer) for e in tests]
    iter0 = [  # the checker reads after the last "Final answer:"; the rule takes the last number
        f"Final answer: {golds[0]}",  # both right
        f"Final answer: {golds[1]}\nCheck: {golds[1] + 1}",  # checker right, rule wrong
        f"The result is {golds[2]}",  # checker wrong (no answer line), rule right
        f"Final answer: {golds[3] + 1}",  # both wrong
        f"Final answer: {golds[4]}",  # both right
        "I do not know",  # both wrong
    ]
    iter1 = [f"{g} is it. Final answer: {g}" for g in golds]  # all right by both
    preds = {t: [{"id": e.id, "gold": e.gold_answer, "greedy": text,
                  "correct": task.is_correct(text, e.gold_answer)} for e, text in zip(tests, texts)]
             for t, texts in ((0, iter0), (1, iter1))}
    assert [p["correct"] for p in preds[0]] == [True, True, False, False, True, False]
    root = write_run(tmp_path_factory.mktemp("runs") / "arith-rpo-x", dataclasses.asdict(ARITH), preds)
    return root, tests


def test_agreement_counts_on_arith(arith_run):
    root, _ = arith_run
    r = analyse_run(root, "rpo seed=0", n_rows=4)
    assert r.dataset == "arith" and not r.by_level and not r.by_subject  # no MATH metadata
    assert r.agreement[0] == {"n": 6, "agree": 4, "checker_right": 3, "rule_wrong_of_right": 1,
                              "checker_wrong": 3, "rule_right_of_wrong": 1}
    assert r.agreement[1] == {"n": 6, "agree": 6, "checker_right": 6, "rule_wrong_of_right": 0,
                              "checker_wrong": 0, "rule_right_of_wrong": 0}
    table = agreement_table([r], "Checker agreement — arith")
    assert table.frame.loc[("rpo seed=0", 0)].tolist() == ["6", "66.7", "1/3", "1/3"]
    assert table.frame.loc[("rpo seed=0", 1)].tolist() == ["6", "100.0", "0/6", "0/0"]
    sampled = analyse_run(root, "rpo seed=0", sample=4)  # a seeded sample of 4 of the 6
    assert sampled.agreement[0]["n"] == 4
    assert sampled.agreement == analyse_run(root, "rpo seed=0", sample=4).agreement


def test_spot_check_rows_and_pages(arith_run, tmp_path):
    root, tests = arith_run
    r = analyse_run(root, "rpo seed=0", n_rows=4)
    ids = [row["id"] for row in r.rows[0]]
    assert len(ids) == 4 == len(set(ids)) and [row["id"] for row in r.rows[1]] == ids  # same problems
    by_id = {e.id: e for e in tests}
    for t in (0, 1):
        for row in r.rows[t]:
            ex = by_id[row["id"]]
            assert (row["prompt"], row["question"], row["gold"]) == (ex.prompt, ex.question, ex.gold_answer)
            assert row["iteration"] == t and row["run"] == "rpo seed=0"
    every = analyse_run(root, "rpo seed=0", n_rows=10).rows[0]  # all 6 problems, in order
    assert [row["id"] for row in every] == [e.id for e in tests]
    # "Final answer: g\nCheck: g+1": the checker's answer and verdict, the rule's verdict
    assert (every[1]["answer"], every[1]["verdict"], every[1]["rule_verdict"]) == (
        tests[1].gold_answer, True, False)
    assert (every[5]["answer"], every[5]["verdict"], every[5]["rule_verdict"]) == (None, False, False)
    files = write_spot_check([r], tmp_path)
    assert [f.name for f in files] == ["rpo_seed=0-iter0.jsonl", "rpo_seed=0-iter1.jsonl"]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert rows == r.rows[0]
    assert set(rows[0]) == {"run", "iteration", "id", "prompt", "question", "chain_of_thought",
                            "answer", "gold", "verdict", "rule_verdict"}
    md, page = (tmp_path / "spot_check.md").read_text(), (tmp_path / "spot_check.html").read_text()
    for row in r.rows[1]:
        assert row["id"] in md and row["chain_of_thought"] in md and row["id"] in page
    assert md.count("## rpo seed=0, iteration") == 2 and page.startswith("<!DOCTYPE html>")


def math_truth(ids: list[str]) -> dict[str, tuple[int, str]]:
    """id -> (level, subject) read straight from the data files (ids file line-aligned)."""
    folder = SHARED_DATA / "math"
    names = folder.joinpath("test_ids.txt").read_text().split()
    recs = [json.loads(line) for line in folder.joinpath("test.jsonl").read_text().splitlines()]
    want = set(ids)
    return {n: (int(r["level"].split()[-1]), n.split("/")[1]) for n, r in zip(names, recs) if n in want}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no benchmark data at {SHARED_DATA}")
def test_math_accuracy_by_level_and_subject(tmp_path):
    from irpo.tasks import build_task

    cfg = HubTaskConfig(name="math", data_dir=str(SHARED_DATA), hub_name="EleutherAI/hendrycks_math",
                        valid_size=0, test_size=40, num_shots=4)
    tests = build_task(cfg).load_split("test")
    truth = math_truth([e.id for e in tests])
    # Correct on every third problem, as the checker would record it.
    preds = [{"id": e.id, "gold": e.gold_answer, "correct": i % 3 == 0,
              "greedy": f"Final answer: $\\boxed{{{e.gold_answer if i % 3 == 0 else 'x'}}}$"}
             for i, e in enumerate(tests)]
    root = write_run(tmp_path / "math-rpo-x", dataclasses.asdict(cfg), {0: preds})
    r = analyse_run(root, "rpo seed=0", n_rows=3)
    want_level, want_subject = {}, {}
    for p in preds:
        level, subject = truth[p["id"]]
        want_level.setdefault(level, []).append(p["correct"])
        want_subject.setdefault(subject, []).append(p["correct"])
    assert r.by_level[0] == {k: (sum(v) / len(v), len(v)) for k, v in sorted(want_level.items())}
    assert r.by_subject[0] == {k: (sum(v) / len(v), len(v)) for k, v in sorted(want_subject.items())}
    assert sum(n for _, n in r.by_level[0].values()) == 40
    assert r.agreement[0]["agree"] == 40  # the boxed gold is right by the strict rule too
    table = breakdown_table([r], "by_level", "MATH accuracy by level — math")
    level, (acc, _) = next(iter(r.by_level[0].items()))
    assert table.frame.loc[("rpo seed=0", 0), str(level)] == f"{100 * acc:.1f}"


def test_report_adds_the_error_analysis_of_runs_it_can_read(arith_run, tmp_path):
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from irpo.report import build_report

    root, _ = arith_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("errors", artifact_location=(tmp_path / "art").as_uri())
    for seed, run_dir in ((0, root), (1, tmp_path / "elsewhere")):
        tags = {"method": "rpo", "dataset": "arith", "model": "tiny", "seed": str(seed),
                "run_dir": str(run_dir), "git_commit": "abc"}
        rid = client.create_run(exp, tags=tags).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(rid, metrics=[Metric("test/accuracy", a, now, t) for t, a in enumerate((0.5, 1.0))])
        client.set_terminated(rid)
    rep = build_report(uri, "errors", out_dir=tmp_path / "out", log_run=False, spot_check=3)
    agree = rep.tables["Checker agreement — arith"].frame
    assert list(agree.index) == [("rpo seed=0", 0), ("rpo seed=0", 1)]
    assert agree["checker ✓ → rule ✗"].tolist() == ["1/3", "0/6"]
    md = rep.markdown.read_text()
    assert "## Error analysis — arith" in md and "error analysis skipped: 1 runs" in md
    assert "rpo seed=1" in md  # the run whose directory is not here is named
    assert sorted(p.name for p in (tmp_path / "out/spot_check").iterdir()) == [
        "rpo_seed=0-iter0.jsonl", "rpo_seed=0-iter1.jsonl"]
    assert "Checker agreement" in rep.html.read_text()
    none = build_report(uri, "errors", out_dir=tmp_path / "plain", log_run=False, spot_check=0)
    assert "Checker agreement — arith" not in none.tables
    assert not (tmp_path / "plain/spot_check").exists()
