"""Runs and metric histories out of MLflow, as pandas frames.

Used by :func:`irpo.report.build_report` (``python -m irpo.report``) and by the
sweep scripts' run lookup (``python -m irpo.report.lookup``). What it reads is
what irpo.tracking writes: one MLflow run per experiment (sweep point), tags
``method, dataset, model, beta, alpha, seed, iterations, run_dir``, the
resolved config as dotted params, per-iteration metrics with step = iteration
and training curves with step = global training step.

Filters: ``key=value`` / ``key!=value`` shorthands, or any MLflow filter
clause. A bare key is a tag when irpo.tracking writes that tag (or it is
``variant``/``sweep``), a param otherwise: ``dataset=arith`` means
``tags.dataset = 'arith'`` and ``trainer.epochs=3`` means
``params.`trainer.epochs` = '3'``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPORT_TAG = "irpo.report"  # the summary runs this package logs; never an input
TRACKER_TAGS = ("method", "dataset", "model", "beta", "alpha", "seed", "iterations",
                "git_commit", "run_dir", "variant", "sweep", "gpus")
# Training curves (step = global training step); every other metric but
# peak_rss_mb is per iteration (step = iteration t, t = 0 is M0).
CURVE_KEYS = ("train/loss", "train/dpo", "train/nll", "logps/chosen", "logps/rejected",
              "logps/chosen_delta", "logps/rejected_delta", "rewards/accuracy",
              "rewards/margin", "train/lr", "train/grad_norm")
PLOTTED_CURVES = ("train/loss", "train/dpo", "train/nll", "logps/chosen", "logps/rejected",
                  "rewards/margin", "rewards/accuracy")
NOT_PER_ITERATION = set(CURVE_KEYS) | {"peak_rss_mb"}
_PREFIXES = {"tags": "tags", "tag": "tags", "params": "params", "param": "params",
             "metrics": "metrics", "metric": "metrics", "attributes": "attributes",
             "attribute": "attributes", "attr": "attributes"}
_SHORTHAND = re.compile(r"^\s*([A-Za-z0-9_.\-/@]+)\s*(!=|=)\s*(.*?)\s*$")


class ReportError(RuntimeError):
    """Nothing (or something unusable) to report; the message names what and where."""


def default_tracking_uri() -> str:
    """The project's store: sqlite under $IRPO_OUTPUT_ROOT (default ./outputs), as the driver."""
    import os

    from irpo.tracking import default_tracking_uri as driver_default

    return driver_default(os.environ.get("IRPO_OUTPUT_ROOT", "outputs"))


def _quote_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_]+", key) else f"`{key}`"


def filter_clause(item: str) -> str:
    """One ``--filter`` item -> an MLflow filter clause (shorthand expanded, raw passed through)."""
    m = _SHORTHAND.match(item)
    if m is None or " " in m.group(1):
        return item.strip()  # already MLflow syntax: "metrics.`test/accuracy` > 0.5"
    key, op, value = m.groups()
    value = value.strip("'\"")
    head, _, rest = key.partition(".")
    if head in _PREFIXES and rest:
        kind, name = _PREFIXES[head], rest
    else:
        kind, name = ("tags" if key in TRACKER_TAGS else "params"), key
    if kind == "metrics":  # numbers, unquoted
        return f"{kind}.{_quote_key(name)} {op} {value}"
    quote = '"' if "'" in value else "'"
    return f"{kind}.{_quote_key(name)} {op} {quote}{value}{quote}"


def filter_string(filters: list[str], raw: str | None = None) -> str:
    clauses = [filter_clause(f) for f in filters if f.strip()]
    if raw and raw.strip():  # MLflow's grammar has AND only, so appending is all there is
        clauses.append(raw.strip())
    return " and ".join(clauses)


@dataclass
class RunSet:
    """The selected runs: one row per run (tags.* and params.* columns) and metric histories."""

    runs: pd.DataFrame  # index run_id; columns name, status, tags.*, params.*
    iters: pd.DataFrame  # run_id, key, step, value  (per-iteration metrics)
    curves: pd.DataFrame  # run_id, key, step, value  (training curves, PLOTTED_CURVES)
    excluded: dict[str, int]  # why -> how many runs were left out
    filter: str
    experiment: str
    tracking_uri: str


def client_for(uri: str):
    """An MlflowClient; a sqlite file that does not exist is an error, not a new empty store."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ReportError(f"tracking URI {uri}: no such MLflow store ({path} does not exist); "
                              "run an experiment first or pass --tracking-uri")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment named {name!r} at {uri}; "
                          f"experiments there: {', '.join(names) or '(none)'}")
    return exp.experiment_id


def search(client, exp_id: str, flt: str) -> list:
    """Every run of the experiment that matches (all pages)."""
    from mlflow.exceptions import MlflowException

    out, token = [], None
    while True:
        try:
            page = client.search_runs([exp_id], filter_string=flt, max_results=1000,
                                      page_token=token)
        except MlflowException as e:
            raise ReportError(f"MLflow rejected the filter {flt!r}: {e.message}") from None
        out.extend(page)
        token = page.token
        if not token:
            return out


def runs_frame(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
               "start_time": r.info.start_time}
        row.update({f"tags.{k}": v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row["metric_keys"] = tuple(sorted(r.data.metrics))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run_id") if rows else pd.DataFrame()


def histories(client, runs: pd.DataFrame, want) -> pd.DataFrame:
    """Long frame of the metric histories ``want(key)`` selects; the last value per step wins
    (a stage redone after a kill logs its steps again)."""
    rows = []
    for run_id, keys in runs["metric_keys"].items():
        for key in keys:
            if want(key):
                rows += [(run_id, key, m.step, m.value, m.timestamp)
                         for m in client.get_metric_history(run_id, key)]
    df = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    df = df.sort_values("timestamp", kind="stable").drop_duplicates(
        ["run_id", "key", "step"], keep="last")
    return df.drop(columns="timestamp").sort_values(["run_id", "key", "step"]).reset_index(drop=True)


def load_runs(uri: str, experiment: str, filters: list[str] | None = None,
              raw_filter: str | None = None, include_unfinished: bool = False) -> RunSet:
    """The runs a report is about, with their histories. Raises ReportError if there are none."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, uri)
    flt = filter_string(filters or [], raw_filter)
    found = search(client, exp_id, flt)
    frame = runs_frame(found)
    excluded: dict[str, int] = {}
    if not frame.empty:
        is_report = frame.get(f"tags.{REPORT_TAG}", pd.Series(index=frame.index)).eq("1")
        excluded["report summary runs"] = int(is_report.sum())
        frame = frame[~is_report]
        if not include_unfinished:
            unfinished = frame["status"] != "FINISHED"
            excluded["unfinished runs (--include-unfinished to keep)"] = int(unfinished.sum())
            frame = frame[~unfinished]
    excluded = {k: v for k, v in excluded.items() if v}
    if frame.empty:
        total = len(search(client, exp_id, ""))
        left = "; ".join(f"{v} {k}" for k, v in excluded.items())
        raise ReportError(f"experiment {experiment!r} at {uri}: no runs to report with filter "
                          f"{flt or '(none)'!r} ({total} runs in the experiment"
                          f"{'; left out: ' + left if left else ''})")
    iters = histories(client, frame, lambda k: k not in NOT_PER_ITERATION)
    curves = histories(client, frame, lambda k: k in PLOTTED_CURVES)
    return RunSet(frame, iters, curves, excluded, flt, experiment, uri)


def find_runs(uri: str, experiment: str, filters: list[str]) -> pd.DataFrame:
    """Finished, non-report runs matching ``filters``, newest first (for the sweep scripts)."""
    client = client_for(uri)
    frame = runs_frame(search(client, experiment_id(client, experiment, uri),
                              filter_string(filters)))
    if frame.empty:
        return frame
    keep = frame["status"].eq("FINISHED")
    if f"tags.{REPORT_TAG}" in frame:
        keep &= ~frame[f"tags.{REPORT_TAG}"].eq("1")
    return frame[keep].sort_values("start_time", ascending=False)
