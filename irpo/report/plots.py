"""The report's figures as PNG files (matplotlib, Agg backend: no display needed).

- accuracy per iteration, one line per row of Table 1 (mean ± std over runs);
- a β × α heatmap of final accuracy for every grid of :func:`irpo.report.tables.grids`;
- training curves against the global training step (it continues across
  iterations): log-probs of chosen and rejected responses (the paper's Fig. 2-3),
  the loss terms, and the implicit-reward margin and accuracy.

Each function writes one file and returns its path; called by irpo.report.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are built on headless machines
import matplotlib.pyplot as plt
import pandas as pd

from irpo.report.tables import Table, row_order


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_plot(iters: pd.DataFrame, lab: pd.Series, path: Path, title: str,
                  key: str = "test/accuracy") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sel = iters[iters["key"] == key].assign(label=lambda d: d["run_id"].map(lab))
    for label in sorted(sel["label"].unique(), key=row_order):
        stats = sel[sel["label"] == label].groupby("step")["value"].agg(["mean", "std"])
        ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0),
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("iteration t (0 = M0)")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def heatmap(grid: Table, path: Path) -> Path:
    mean = grid.numbers["mean"]  # beta x alpha, fractions
    fig, ax = plt.subplots(figsize=(1.2 * len(mean.columns) + 2.4, 0.8 * len(mean.index) + 1.8))
    im = ax.imshow(100 * mean.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(mean.columns)), [f"{a:g}" for a in mean.columns])
    ax.set_yticks(range(len(mean.index)), [f"{b:g}" for b in mean.index])
    ax.set_xlabel("α (NLL weight)")
    ax.set_ylabel("β")
    values = 100 * mean.to_numpy(dtype=float)
    for i, row in enumerate(grid.frame.itertuples(index=False)):
        for j, cell in enumerate(row):  # dark text on the bright end of viridis
            bright = values[i, j] == values[i, j] and im.norm(values[i, j]) > 0.6
            ax.text(j, i, cell, ha="center", va="center", fontsize=7, color="k" if bright else "w")
    fig.colorbar(im, ax=ax, label="final accuracy (%)")
    ax.set_title(grid.title, fontsize=9)
    return _save(fig, path)


def _mean_curve(curves: pd.DataFrame, ids, key: str) -> pd.Series:
    """Mean over runs at each global step, lightly smoothed (per-step values are noisy)."""
    sel = curves[(curves["key"] == key) & curves["run_id"].isin(ids)]
    mean = sel.groupby("step")["value"].mean()
    window = max(1, len(mean) // 50)
    return mean.rolling(window, min_periods=1).mean()


def curves_plot(curves: pd.DataFrame, lab: pd.Series, keys: tuple[str, ...], path: Path,
                title: str) -> Path | None:
    """One panel per key present, one line per row label; None if no key has data."""
    keys = tuple(k for k in keys if (curves["key"] == k).any())
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    present = lab[lab.index.isin(curves["run_id"].unique())]
    labels = sorted(present.unique(), key=row_order)
    # One colour per row in every panel: rows without a key (sft has no rejected
    # responses) must not shift the colour cycle of the panels they are absent from.
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, key in zip(axes[0], keys):
        for label in labels:
            line = _mean_curve(curves, present[present == label].index, key)
            if not line.empty:
                ax.plot(line.index, line.to_numpy(), label=label, lw=1.2, color=colours[label])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("global training step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


FIGURES = (
    ("logps", ("logps/chosen", "logps/rejected"),
     "log-probabilities of chosen and rejected responses"),
    ("loss", ("train/loss", "train/dpo", "train/nll"), "loss terms"),
    ("margin", ("rewards/margin", "rewards/accuracy"), "implicit reward margin and accuracy"),
)


def all_curves(curves: pd.DataFrame, lab: pd.Series, out: Path, dataset: str) -> list[tuple[str, Path]]:
    made = []
    for name, keys, what in FIGURES:
        path = curves_plot(curves, lab, keys, out / f"{name}_{slug(dataset)}.png",
                           f"{what} — {dataset}")
        if path is not None:
            made.append((f"{what.capitalize()} — {dataset}", path))
    return made
