"""irpo.report on real MLflow runs made here with known metric values.

A tmp sqlite store gets the runs the driver would log (same tags, dotted params,
step = iteration for evaluation metrics, step = global step for training
curves): rpo and dpo x seeds 0 and 1 x iterations 0..2 on arith, plus runs the
report must leave out (another dataset, an unfinished run), and a β × α grid
in a second experiment. The tables must hold the hand-computed mean ± std, the
PNGs must be real PNGs and the HTML page must embed them.
"""

from __future__ import annotations

import base64
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from irpo.report import ReportError, build_report
from irpo.report.__main__ import main as report_main
from irpo.report.load import filter_clause
from irpo.report.lookup import main as lookup_main
from irpo.report.tables import labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# test accuracy at t = 0, 1, 2 and maj@4 at t = 0 and t = 2, per (method, seed)
ACC = {("rpo", 0): [0.50, 0.60, 0.70], ("rpo", 1): [0.50, 0.64, 0.76],
       ("dpo", 0): [0.50, 0.55, 0.58], ("dpo", 1): [0.50, 0.57, 0.54]}
MAJ0 = {0: 0.52, 1: 0.56}
MAJ_LAST = {("rpo", 0): 0.80, ("rpo", 1): 0.90, ("dpo", 0): 0.60, ("dpo", 1): 0.62}


def make_run(client, exp, *, method="rpo", dataset="arith", seed=0, beta=0.1, alpha=1.0,
             acc=(0.5, 0.6, 0.7), maj=None, extra_params=None, model="tiny", finish=True):
    tags = {"method": method, "dataset": dataset, "model": model, "beta": str(beta),
            "alpha": str(alpha), "seed": str(seed), "iterations": str(len(acc) - 1),
            "git_commit": "abc1234def", "run_dir": f"/runs/{dataset}-{method}-{seed}"}
    run = client.create_run(exp, tags=tags, run_name=f"{dataset}-{method}-{seed}")
    rid = run.info.run_id
    params = {"method.name": method, "dataset.name": dataset, "beta": beta, "alpha": alpha,
              "seed": seed, "iterations": len(acc) - 1, "run_name": None,
              "output_root": "/tmp/x", "tracking.experiment_name": "whatever",
              "trainer.epochs": 1.0, "eval.maj_k": 4, **(extra_params or {})}
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    now = int(time.time() * 1000)
    metrics = [Metric("test/accuracy", a, now, t) for t, a in enumerate(acc)]
    metrics += [Metric("test/maj_at_k", v, now, t) for t, v in (maj or {}).items()]
    for t in range(1, len(acc)):  # per-iteration costs: 100 tokens per iteration, 3 s training
        metrics += [Metric("sample/tokens_sampled", 100.0 * t, now, t),
                    Metric("sample/wall_s", 2.0, now, t), Metric("train/wall_s", 3.0, now, t),
                    Metric("data/data_examples", 10.0 + seed, now, t), Metric("eval/wall_s", 1.0, now, t)]
    metrics += [Metric("eval/wall_s", 1.0, now, 0)]
    for step in range(1, 7):  # training curves: global step continues across iterations
        metrics += [Metric("train/loss", 0.7 - 0.05 * step, now, step),
                    Metric("train/dpo", 0.69 - 0.05 * step, now, step),
                    Metric("train/nll", 0.3, now, step),
                    Metric("logps/chosen", -20.0 + step, now, step),
                    Metric("logps/rejected", -20.0 - step, now, step),
                    Metric("rewards/margin", 0.1 * step, now, step)]
    client.log_batch(rid, metrics=metrics)
    if finish:
        client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study", artifact_location=(root / "art").as_uri())
    for (method, seed), acc in ACC.items():
        make_run(client, exp, method=method, seed=seed, acc=acc,
                 maj={0: MAJ0[seed], 2: MAJ_LAST[(method, seed)]})
    make_run(client, exp, method="rpo", dataset="gsm8k", acc=(0.1, 0.2, 0.3))  # filtered out
    make_run(client, exp, method="rpo", acc=(0.0, 0.0, 0.0), finish=False)  # unfinished
    grid = client.create_experiment("grid", artifact_location=(root / "art2").as_uri())
    for beta, alpha, final in [(0.1, 0.0, 0.40), (0.1, 1.0, 0.60), (0.5, 0.0, 0.30),
                               (0.5, 1.0, 0.50)]:
        make_run(client, grid, beta=beta, alpha=alpha, acc=(0.2, final),
                 extra_params={"beta": beta, "alpha": alpha})
    return root, uri, client


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    _, uri, _ = store
    return build_report(uri, "study", filters=["dataset=arith"],
                        out_dir=tmp_path_factory.mktemp("report"))


def test_table1_cells_are_mean_and_sample_std_over_seeds(report):
    t = report.tables["Table 1 — arith"].frame
    assert list(t.index) == ["M0 (greedy CoT, tiny)", "dpo", "rpo"]
    assert list(t.columns) == ["method", "runs", "t=0", "t=1", "t=2", "maj@4 (last t)"]
    # rpo: t=1 (0.60, 0.64) -> 62.0 ± 2.8; t=2 (0.70, 0.76) -> 73.0 ± 4.2; maj (0.8, 0.9)
    assert t.loc["rpo", ["t=0", "t=1", "t=2", "maj@4 (last t)"]].tolist() == [
        "50.0 ± 0.0", "62.0 ± 2.8", "73.0 ± 4.2", "85.0 ± 7.1"]
    assert t.loc["dpo", ["t=1", "t=2", "maj@4 (last t)"]].tolist() == [
        "56.0 ± 1.4", "56.0 ± 2.8", "61.0 ± 1.4"]
    assert t.loc["rpo", "runs"] == 2 and t.loc["dpo", "runs"] == 2
    # M0: iteration 0, one value per seed; maj@4 of M0 is (0.52, 0.56)
    assert t.loc["M0 (greedy CoT, tiny)", ["t=0", "t=1", "maj@4 (last t)"]].tolist() == [
        "50.0 ± 0.0", "–", "54.0 ± 2.8"]
    numbers = report.tables["Table 1 — arith"].numbers
    assert numbers[("rpo", 2)][0] == pytest.approx(0.73)
    assert numbers[("rpo", 2)][1] == pytest.approx(0.0424264, abs=1e-6)


def test_filters_and_exclusions(report):
    assert len(report.runs.runs) == 4  # not the gsm8k run, not the unfinished one
    assert set(report.runs.runs["tags.dataset"]) == {"arith"}
    assert report.runs.excluded == {"unfinished runs (--include-unfinished to keep)": 1}
    assert "Table 1 — gsm8k" not in report.tables


def test_cost_table(report):
    cost = report.tables["Cost per iteration — arith"].numbers["frame"]
    rpo = cost[cost["row"] == "rpo"].set_index("t")
    assert rpo.loc[2, "tokens sampled"] == 200.0
    assert rpo.loc[1, "train examples"] == 10.5  # seeds log 10 and 11 examples
    assert rpo.loc[1, "total s"] == 6.0  # sample 2 + train 3 + eval 1 (label/data not logged)
    assert rpo.loc[1, "device-h"] == 0.0 and rpo.loc[0, "total s"] == 1.0
    text = report.tables["Cost per iteration — arith"].frame
    assert text.loc[("rpo", 1), "train s"] == "3.0" and text.loc[("rpo", 1), "label s"] == "–"
    assert text.loc[("rpo", 2), "tokens sampled"] == "200"
    assert text.loc[("rpo", 1), "train examples"] == "10.5"  # a mean, not a count: one decimal


def test_pngs_are_valid_and_embedded_in_html(report):
    import matplotlib.image
    from PIL import Image

    names = sorted(p.name for p in report.pngs)
    assert names == ["accuracy_arith.png", "logps_arith.png", "loss_arith.png", "margin_arith.png"]
    page = report.html.read_text()
    assert page.count("data:image/png;base64,") == len(report.pngs)
    for png in report.pngs:
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        with Image.open(png) as im:
            im.verify()
        assert matplotlib.image.imread(png).shape[0] > 100
        assert base64.b64encode(data).decode() in page
    assert "<td>62.0 ± 2.8</td>" in page and "src=\"" not in page.replace('src="data:', "")
    md = report.markdown.read_text()
    assert "| rpo | rpo | 2 | 50.0 ± 0.0 | 62.0 ± 2.8 | 73.0 ± 4.2 | 85.0 ± 7.1 |" in md
    assert "![" in md and "(accuracy_arith.png)" in md


def test_summary_run_logged_and_never_an_input(store, report, tmp_path):
    _, uri, client = store
    exp = client.get_experiment_by_name("study").experiment_id
    (summary,) = client.search_runs([exp], "tags.`irpo.report` = '1'")
    assert summary.info.run_id == report.summary_run_id and summary.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"report.md", "report.html", "accuracy_arith.png"} <= files
    # unfiltered, the search finds the summary run too; it is dropped, and so is the unfinished run
    again = build_report(uri, "study", out_dir=tmp_path, log_run=False)
    assert again.summary_run_id is None
    assert sorted(again.runs.runs["tags.dataset"]) == ["arith"] * 4 + ["gsm8k"]
    assert again.runs.excluded == {"report summary runs": 1,
                                   "unfinished runs (--include-unfinished to keep)": 1}
    assert again.tables["Table 1 — gsm8k"].frame.loc["rpo", "t=2"] == "30.0"


def test_beta_alpha_grid(store, tmp_path):
    _, uri, _ = store
    rep = build_report(uri, "grid", out_dir=tmp_path, log_run=False)
    grid = rep.tables["β × α — arith, rpo"].frame
    assert list(grid.index) == ["β=0.1", "β=0.5"] and list(grid.columns) == ["α=0", "α=1"]
    assert grid.loc["β=0.1"].tolist() == ["40.0", "60.0"]
    assert grid.loc["β=0.5"].tolist() == ["30.0", "50.0"]
    png = tmp_path / "grid_arith_rpo.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    # the grid's runs differ in beta and alpha, so Table 1 keeps them apart
    assert "rpo (alpha=0.0, beta=0.5)" in rep.tables["Table 1 — arith"].frame.index


def test_cli_writes_report_and_lookup_finds_run(store, tmp_path, capsys):
    _, uri, _ = store
    out = tmp_path / "cli"
    assert report_main(["--tracking-uri", uri, "--experiment", "study", "--filter", "dataset=arith",
                        "--filter", "method=rpo", "--out", str(out), "--no-log-run"]) == 0
    assert (out / "report.html").is_file() and "| rpo | rpo | 2 |" in capsys.readouterr().out
    assert lookup_main(["--tracking-uri", uri, "--experiment", "study", "--filter", "method=dpo",
                        "--filter", "seed=1"]) == 0
    assert capsys.readouterr().out.strip() == "/runs/arith-dpo-1"


def test_errors_name_what_is_missing(store, tmp_path, capsys):
    root, uri, _ = store
    with pytest.raises(ReportError, match="no MLflow experiment named 'nope'.*study"):
        build_report(uri, "nope", out_dir=tmp_path)
    with pytest.raises(ReportError, match="no runs to report with filter \"tags.dataset = 'math'\""):
        build_report(uri, "study", filters=["dataset=math"], out_dir=tmp_path)
    with pytest.raises(ReportError, match="no run logged metric 'test/pass@1'"):
        build_report(uri, "study", key="test/pass@1", out_dir=tmp_path, log_run=False)
    missing = root / "missing.db"
    assert report_main(["--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    assert lookup_main(["--tracking-uri", uri, "--experiment", "study", "--filter", "method=sft"]) == 2


@pytest.mark.parametrize("item, clause", [
    ("dataset=arith", "tags.dataset = 'arith'"),
    ("method!=dpo", "tags.method != 'dpo'"),
    ("trainer.epochs=3", "params.`trainer.epochs` = '3'"),
    ("tags.sweep=table1", "tags.sweep = 'table1'"),
    ("params.beta=0.1", "params.beta = '0.1'"),
    ("metrics.`test/accuracy` > 0.5", "metrics.`test/accuracy` > 0.5"),
])
def test_filter_shorthands(item, clause):
    assert filter_clause(item) == clause


def test_labels_split_variants_and_name_the_initial_model():
    import pandas as pd

    runs = pd.DataFrame({
        "tags.dataset": ["arith"] * 5, "tags.method": ["rpo", "rpo", "rpo", "rpo", "sft"],
        "tags.model": ["tiny", "tiny", "tiny", "sft", "tiny"],
        "params.seed": ["0", "1", "0", "0", "0"],
        "params.trainer.epochs": ["1.0", "1.0", "3.0", "1.0", "1.0"],
        "params.model.path": ["None", "None", "None", "/o/runs/t1-sft-ab/iter1/train/model", "None"],
        "params.run_name": ["a", "b", "c", "d", "e"],
    }, index=["r0", "r1", "r2", "r3", "r4"])
    assert labels(runs).tolist() == ["rpo (epochs=1.0)", "rpo (epochs=1.0)", "rpo (epochs=3.0)",
                                     "rpo (init=sft, epochs=1.0)", "sft"]
    assert labels(runs, ["seed"]).tolist() == ["seed=0", "seed=1", "seed=0", "seed=0", "seed=0"]


def test_a_row_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    # sft logs no rejected log-probs; dpo must not take sft's colour in that panel.
    import pandas as pd

    from irpo.report import plots

    rows = [(run, key, step, -1.0 * step)
            for run, keys in (("r_sft", ["logps/chosen"]),
                              ("r_dpo", ["logps/chosen", "logps/rejected"]))
            for key in keys for step in (1, 2, 3)]
    curves = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    lab = pd.Series({"r_sft": "sft", "r_dpo": "dpo"})
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.setdefault("fig", fig) and path)
    plots.curves_plot(curves, lab, ("logps/chosen", "logps/rejected"), tmp_path / "x.png", "t")
    colour = {}
    for ax in seen["fig"].axes:
        for line in ax.get_lines():
            colour.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colour) == {"sft", "dpo"}
    assert all(len(c) == 1 for c in colour.values()) and colour["sft"] != colour["dpo"]
