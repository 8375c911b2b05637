"""The report's tables, computed from a :class:`irpo.report.load.RunSet` with pandas.

- :func:`table1`: the paper's Table 1: one row per method (and variant), one
  column per iteration t = 0..T of test accuracy, mean ± std over the runs of
  the row (seeds), and maj@k of each run's last iteration; M0's greedy CoT is
  its own row (iteration 0 of the runs that start from the dataset's M0).
- :func:`grids`: final accuracy over β × α, for each method whose runs vary them.
- :func:`cost_table`: per row and iteration, what was sampled and trained and
  the wall time of every stage, with device-hours when the runs say how many GPUs.
- :func:`heldout_table`: accuracy on held-out tasks (metrics ``heldout/<task>/accuracy``).

Rows are labelled by :func:`labels`. Accuracies are shown in percent, std is the
sample standard deviation (ddof = 1) over the runs of a cell.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

METHOD_ORDER = ("sft", "star", "star_2x", "dpo", "rpo", "rpo_2x")
STAGES = ("sample", "label", "data", "train", "eval")
# Params that never tell two configurations apart: where a run is stored or
# logged, and the seed (rows average over seeds).
_NOT_A_VARIANT = re.compile(r"^params\.(seed|run_name|output_root|cache_dir|tracking\..*|hydra\..*)$")
DASH = "–"


@dataclass
class Table:
    title: str
    frame: pd.DataFrame  # string cells, ready to print
    note: str = ""
    numbers: dict = field(default_factory=dict)  # numeric companions (for plots and tests)


def column(runs: pd.DataFrame, name: str, default: str = "None") -> pd.Series:
    """A tags.*/params.* column with missing values as ``default`` (runs from older code)."""
    if name not in runs:
        return pd.Series(default, index=runs.index, dtype=object)
    return runs[name].fillna(default).astype(str)


def _short_value(value: str) -> str:
    m = re.search(r"/runs/([^/]+)/(iter\d+)/train/model/?$", value)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return value.rstrip("/").rsplit("/", 1)[-1] if "/" in value else value


def _short_keys(keys: list[str]) -> dict[str, str]:
    """params.trainer.epochs -> epochs, unless two varying keys end the same."""
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k.removeprefix("params."))
            for k, t in zip(keys, tails)}


def _group_labels(group: pd.DataFrame, method: str, dominant_model: str) -> dict[str, str]:
    """Labels within one (dataset, method): the method, its variant tag, its initial model
    when not the dataset's M0, and every param that differs between the group's runs."""
    models = column(group, "tags.model")
    varying = [c for c in sorted(group.columns) if c.startswith("params.") and not _NOT_A_VARIANT.match(c)
               and not (models.nunique() > 1 and c.startswith("params.model."))
               and column(group, c).nunique() > 1]
    short = _short_keys(varying)
    out = {}
    for run_id in group.index:
        parts = []
        variant = column(group, "tags.variant", "").loc[run_id]
        if variant:
            parts.append(variant)
        if models.loc[run_id] != dominant_model:
            parts.append(f"init={models.loc[run_id]}")
        parts += [f"{short[c]}={_short_value(column(group, c).loc[run_id])}" for c in varying]
        out[run_id] = f"{method} ({', '.join(parts)})" if parts else method
    return out


def dominant_models(runs: pd.DataFrame) -> dict[str, str]:
    """Per dataset, the initial model most runs start from (taken to be M0)."""
    df = pd.DataFrame({"dataset": column(runs, "tags.dataset"), "model": column(runs, "tags.model")})
    return {d: g["model"].value_counts().index[0] for d, g in df.groupby("dataset")}


def labels(runs: pd.DataFrame, group_by: list[str] | None = None) -> pd.Series:
    """Row label of every run. ``group_by`` (tags.X / params.X / a bare tag) replaces the
    automatic labels: the label is then those fields' values joined."""
    if group_by:
        cols = [g if g.startswith(("tags.", "params.")) else
                (f"tags.{g}" if f"tags.{g}" in runs else f"params.{g}") for g in group_by]
        return pd.Series([", ".join(f"{c.split('.', 1)[1]}={column(runs, c).loc[i]}" for c in cols)
                          for i in runs.index], index=runs.index)
    dominant = dominant_models(runs)
    out: dict[str, str] = {}
    keys = [column(runs, "tags.dataset"), column(runs, "tags.method", "?")]
    for (dataset, method), group in runs.groupby(keys):
        out.update(_group_labels(group, method, dominant[dataset]))
    return pd.Series(out).loc[runs.index]


def row_order(label: str) -> tuple:
    method = label.split(" ", 1)[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, label)


def mean_std(values) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return math.nan, math.nan, 0
    s = pd.Series(v)
    return float(s.mean()), float(s.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def fmt_pct(values) -> str:
    """'61.2 ± 1.4' (percent, sample std over runs); one run: '61.2'; none: '–'."""
    mean, std, n = mean_std(values)
    if n == 0:
        return DASH
    return f"{100 * mean:.1f}" if n == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"


def wide(iters: pd.DataFrame, key: str) -> pd.DataFrame:
    """run_id x step table of one per-iteration metric."""
    sel = iters[iters["key"] == key]
    return sel.pivot(index="run_id", columns="step", values="value")


def last_value(iters: pd.DataFrame, key: str) -> pd.Series:
    """Each run's value at its last logged step of ``key``."""
    sel = iters[iters["key"] == key].sort_values("step")
    return sel.groupby("run_id")["value"].last()


# maj@k: the driver logs "test/maj_at_k" with k in the param eval.maj_k ("@" is not a
# valid MLflow metric-name character); a key with k in its name (test/maj_8) works too.
_MAJ = re.compile(r"^test/maj(?:_at)?_?(\d+|k)$")


def maj_keys(iters: pd.DataFrame) -> list[str]:
    return sorted(k for k in iters["key"].unique() if _MAJ.match(k))


def maj_column(key: str, runs: pd.DataFrame) -> str:
    k = _MAJ.match(key).group(1)
    if k == "k":  # k from the config; one column even if the runs disagree, so say so
        ks = sorted(column(runs, "params.eval.maj_k", "?").unique())
        k = ks[0] if len(ks) == 1 else "k"
    return f"maj@{k} (last t)"


def _m0_row(runs, iters, model, key, majs) -> dict | None:
    """Greedy CoT of M0: iteration 0 of the runs that start from ``model``, one value per seed
    (greedy decoding of one model gives every method the same iteration 0)."""
    starts = runs.index[column(runs, "tags.model") == model]
    acc = wide(iters, key).reindex(starts)
    if 0 not in acc.columns or acc[0].isna().all():
        return None
    seeds = column(runs, "tags.seed").reindex(starts)
    row = {"method": "M0", "runs": int(acc[0].notna().sum()),
           "t=0": fmt_pct(acc[0].groupby(seeds).mean())}
    for mk in majs:
        m = wide(iters, mk).reindex(starts)
        row[maj_column(mk, runs)] = fmt_pct(m[0].groupby(seeds).mean()) if 0 in m else DASH
    return row


def table1(runs: pd.DataFrame, iters: pd.DataFrame, lab: pd.Series, dataset: str,
           key: str = "test/accuracy") -> Table:
    """Table 1 of one dataset (runs already restricted to it)."""
    acc = wide(iters, key).reindex(runs.index)
    steps = sorted(int(s) for s in acc.columns)
    majs = maj_keys(iters[iters["run_id"].isin(runs.index)])
    rows: dict[str, dict] = {}
    model = dominant_models(runs)[dataset]
    m0 = _m0_row(runs, iters, model, key, majs)
    if m0 is not None:
        rows[f"M0 (greedy CoT, {model})"] = m0
    numbers = {}
    for label in sorted(lab.unique(), key=row_order):
        ids = lab[lab == label].index
        row = {"method": column(runs, "tags.method").loc[ids[0]], "runs": len(ids)}
        for t in steps:
            row[f"t={t}"] = fmt_pct(acc.loc[ids, t])
            numbers[(label, t)] = mean_std(acc.loc[ids, t])
        for mk in majs:
            row[maj_column(mk, runs)] = fmt_pct(last_value(iters, mk).reindex(ids))
        rows[label] = row
    cols = ["method", "runs", *(f"t={t}" for t in steps), *(maj_column(k, runs) for k in majs)]
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=cols).fillna(DASH)
    frame.index.name = "row"
    note = (f"{key} in percent, mean ± sample std over the runs (seeds) of a row; t = 0 is the "
            "initial model; maj@k at each run's last iteration. The M0 row: iteration 0 of the "
            "runs that start from M0, averaged per seed first.")
    return Table(f"Table 1 — {dataset}", frame, note, numbers)


def grids(runs: pd.DataFrame, iters: pd.DataFrame, key: str = "test/accuracy") -> list[Table]:
    """Final ``key`` over β (rows) × α (columns), per (dataset, method) varying them."""
    final = last_value(iters, key)
    df = pd.DataFrame({"dataset": column(runs, "tags.dataset"),
                       "method": column(runs, "tags.method", "?"),
                       "beta": pd.to_numeric(column(runs, "tags.beta", "nan"), errors="coerce"),
                       "alpha": pd.to_numeric(column(runs, "tags.alpha", "nan"), errors="coerce"),
                       "final": final.reindex(runs.index)})
    out = []
    for (dataset, method), g in df.groupby(["dataset", "method"]):
        g = g.dropna(subset=["beta", "alpha"])
        if len(g[["beta", "alpha"]].drop_duplicates()) < 2:
            continue
        cells = g.groupby(["beta", "alpha"])["final"].agg(list)
        mean = cells.map(lambda v: mean_std(v)[0]).unstack("alpha")
        text = cells.map(fmt_pct).unstack("alpha").fillna(DASH)
        text.index = [f"β={b:g}" for b in text.index]
        text.columns = [f"α={a:g}" for a in text.columns]
        text.index.name = "β \\ α"
        out.append(Table(f"β × α — {dataset}, {method}", text,
                         f"final {key} in percent (each run's last iteration), mean ± std over runs.",
                         {"mean": mean, "dataset": dataset, "method": method}))
    return out


def gpus_per_run(runs: pd.DataFrame) -> pd.Series:
    """GPUs a run held: tag or param ``gpus``, else launcher.gpus_per_node × launcher.nodes, else 0."""
    def num(name: str, default: float) -> pd.Series:
        return pd.to_numeric(column(runs, name, "nan"), errors="coerce").fillna(default)

    explicit = num("tags.gpus", math.nan).fillna(num("params.gpus", math.nan))
    launcher = num("params.launcher.gpus_per_node", 0) * num("params.launcher.nodes", 1)
    return explicit.fillna(launcher)


_COST_COLUMNS = {"sample/prompts": "prompts", "sample/samples": "samples",
                 "sample/tokens_sampled": "tokens sampled", "data/data_examples": "train examples",
                 "train/steps": "train steps"}


def _fmt_cost(column_name: str, v: float) -> str:
    if pd.isna(v):
        return DASH
    if column_name == "device-h":
        return f"{v:.2f}"
    if column_name.endswith(" s") or v != int(v):  # seconds, or a count averaged over runs
        return f"{v:,.1f}"
    return f"{v:,.0f}"


def cost_table(runs: pd.DataFrame, iters: pd.DataFrame, lab: pd.Series, dataset: str) -> Table:
    """Per row and iteration: data volumes and wall seconds per stage (mean over runs)."""
    gpus = gpus_per_run(runs)
    records = []
    for label in sorted(lab.unique(), key=row_order):
        ids = lab[lab == label].index
        sel = iters[iters["run_id"].isin(ids)]
        for t in sorted(sel["step"].unique()):
            at = sel[sel["step"] == t].pivot(index="run_id", columns="key", values="value")
            walls = at.reindex(columns=[f"{s}/wall_s" for s in STAGES])
            total = walls.sum(axis=1, min_count=1)
            rec = {"row": label, "t": int(t)}
            for key, name in _COST_COLUMNS.items():
                rec[name] = at[key].mean() if key in at else math.nan
            for s in STAGES:
                rec[f"{s} s"] = walls[f"{s}/wall_s"].mean()
            rec["total s"] = total.mean()
            rec["GPUs"] = gpus.reindex(total.index).mean()
            rec["device-h"] = (total * gpus.reindex(total.index)).mean() / 3600
            records.append(rec)
    num = pd.DataFrame(records)
    text = num.copy()
    for c in text.columns[2:]:
        text[c] = [_fmt_cost(c, v) for v in num[c]]
    text = text.set_index(["row", "t"])
    note = ("mean over the runs of a row; t = 0 only evaluates M0. device-h = wall time of "
            "the stages × GPUs (tag/param `gpus`, or launcher.gpus_per_node × launcher.nodes); "
            "0 on CPU runs, which log no GPU count.")
    return Table(f"Cost per iteration — {dataset}", text, note, {"frame": num})


def heldout_table(runs: pd.DataFrame, iters: pd.DataFrame, lab: pd.Series,
                  dataset: str) -> Table | None:
    """Accuracy on held-out tasks at t = 0 and at each run's last iteration, if any was logged."""
    keys = sorted(k for k in iters["key"].unique()
                  if k.startswith("heldout/") and k.endswith("/accuracy"))
    if not keys:
        return None
    rows = {}
    for label in sorted(lab.unique(), key=row_order):
        ids = lab[lab == label].index
        row = {}
        for k in keys:
            task = k.split("/")[1]
            w = wide(iters, k).reindex(ids)
            row[f"{task} t=0"] = fmt_pct(w[0]) if 0 in w else DASH
            row[f"{task} last t"] = fmt_pct(last_value(iters, k).reindex(ids))
        rows[label] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "row"
    return Table(f"Held-out tasks — trained on {dataset}", frame,
                 "accuracy in percent on each held-out task's test split, mean ± std over runs.")


def to_markdown(table: Table) -> str:
    df = table.frame
    names = list(df.index.names) if df.index.nlevels > 1 else [df.index.name or ""]
    head = [*names, *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [*map(str, idx), *map(str, row.tolist())]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out = f"### {table.title}\n\n" + "\n".join(lines)
    return out + (f"\n\n{table.note}" if table.note else "")
