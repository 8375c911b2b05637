"""Compare runs: paper-style tables and plots from the MLflow runs of the driver.

    python -m irpo.report --experiment table1 --filter dataset=arith --out outputs/reports/t1

reads the matching runs (irpo.report.load), builds Table 1, β × α grids, a cost
table and held-out accuracies (irpo.report.tables) and the figures
(irpo.report.plots), and, from the run directories, an error analysis
(irpo.report.errors: MATH by level and subject, checker agreement, spot-check rows), and
writes ``report.md``, ``report.html`` (self-contained: PNGs embedded), the PNGs and the
spot-check files into the output folder. Unless told not to, it
logs that folder as the artifacts of a summary MLflow run in the same
experiment, tagged ``irpo.report=1`` so that no report reads it as an input.
From Python: ``build_report(uri, experiment, filters=[...], out_dir=...)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from irpo.report.html import Section, render_html, render_markdown
from irpo.report.load import REPORT_TAG, ReportError, RunSet, client_for, experiment_id, load_runs
from irpo.report.tables import Table, column, cost_table, grids, heldout_table, labels, table1

__all__ = ["Report", "ReportError", "build_report", "build_sections"]


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    html: Path
    pngs: list[Path]
    tables: dict[str, Table]  # by title
    runs: RunSet
    summary_run_id: str | None


def _dataset_sections(rs: RunSet, lab: pd.Series, dataset: str, out: Path,
                      key: str) -> list[Section]:
    from irpo.report import plots

    ids = rs.runs.index[column(rs.runs, "tags.dataset") == dataset]
    runs, lab = rs.runs.loc[ids], lab.loc[ids]
    iters = rs.iters[rs.iters["run_id"].isin(ids)]
    curves = rs.curves[rs.curves["run_id"].isin(ids)]
    t1 = table1(runs, iters, lab, dataset, key)
    acc_png = plots.accuracy_plot(iters, lab, out / f"accuracy_{plots.slug(dataset)}.png",
                                  f"{key} per iteration — {dataset}", key)
    sections = [Section(f"Accuracy by iteration — {dataset}", [t1],
                        [(f"{key} per iteration (mean ± std over runs)", acc_png)])]
    gs = grids(runs, iters, key)
    if gs:
        figs = [(g.title, plots.heatmap(g, out / f"grid_{plots.slug(g.title)}.png")) for g in gs]
        sections.append(Section(f"β × α — {dataset}", gs, figs))
    sections.append(Section(f"Training curves — {dataset}",
                            figures=plots.all_curves(curves, lab, out, dataset)))
    held = heldout_table(runs, iters, lab, dataset)
    if held is not None:
        sections.append(Section(f"Held-out tasks — {dataset}", [held]))
    sections.append(Section(f"Cost — {dataset}", [cost_table(runs, iters, lab, dataset)]))
    return sections


def build_sections(rs: RunSet, out: Path, key: str = "test/accuracy",
                   group_by: list[str] | None = None) -> list[Section]:
    """Every section of the report (PNGs written into ``out``), one block per dataset."""
    if key not in set(rs.iters["key"]):
        present = sorted(k for k in rs.iters["key"].unique() if k.startswith(("test/", "heldout/")))
        raise ReportError(f"experiment {rs.experiment!r}, filter {rs.filter or '(none)'!r}: no run "
                          f"logged metric {key!r}; evaluation metrics present: {present}")
    lab = labels(rs.runs, group_by)
    sections = []
    for dataset in sorted(column(rs.runs, "tags.dataset").unique()):
        sections += _dataset_sections(rs, lab, dataset, out, key)
    return sections


def _meta(rs: RunSet) -> list[tuple[str, str]]:
    commits = sorted(column(rs.runs, "tags.git_commit", "?").str[:10].unique())
    meta = [("experiment", rs.experiment), ("tracking URI", rs.tracking_uri),
            ("filter", rs.filter or "(none)"), ("runs", str(len(rs.runs))),
            ("git commits", ", ".join(commits)),
            ("built", time.strftime("%Y-%m-%d %H:%M:%S %Z"))]
    meta += [("left out", f"{n} {why}") for why, n in rs.excluded.items()]
    return meta


def log_summary_run(rs: RunSet, out: Path) -> str:
    """A run in the same experiment holding the report's files (tagged so reports skip it)."""
    client = client_for(rs.tracking_uri)
    exp = experiment_id(client, rs.experiment, rs.tracking_uri)
    tags = {REPORT_TAG: "1", f"{REPORT_TAG}.filter": rs.filter or "(none)",
            f"{REPORT_TAG}.runs": str(len(rs.runs))}
    run = client.create_run(exp, tags=tags, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        client.log_artifacts(run.info.run_id, str(out))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def build_report(tracking_uri: str, experiment: str, filters: list[str] | None = None,
                 raw_filter: str | None = None, out_dir: str | Path = "outputs/reports",
                 key: str = "test/accuracy", group_by: list[str] | None = None,
                 include_unfinished: bool = False, log_run: bool = True,
                 spot_check: int = 20) -> Report:
    rs = load_runs(tracking_uri, experiment, filters, raw_filter, include_unfinished)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a figure from an earlier build must not linger
        old.unlink()
    sections = build_sections(rs, out, key, group_by)
    title = f"irpo report — {experiment}"
    meta = _meta(rs)
    if spot_check > 0:  # from the run directories: MATH breakdown, checker agreement, samples
        from irpo.report.errors import error_sections

        more, notes = error_sections(rs, labels(rs.runs, group_by), out, n_rows=spot_check)
        sections += more
        meta += notes
    md = out / "report.md"
    md.write_text(render_markdown(title, meta, sections, out))
    page = out / "report.html"
    page.write_text(render_html(title, meta, sections))
    run_id = log_summary_run(rs, out) if log_run else None
    return Report(out, md, page, sorted(out.glob("*.png")),
                  {t.title: t for s in sections for t in s.tables}, rs, run_id)
