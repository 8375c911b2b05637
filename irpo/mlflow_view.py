"""A saved MLflow UI view that opens our runs' charts with ``test/accuracy`` first.

The MLflow UI (3.x) lays the charts of an experiment out by itself: one section per
metric-key prefix (``data``, ``eval``, ``label``, ...), sections and charts sorted by
name, so ``test/accuracy`` is far down. Metric keys stay as they are; instead, the
experiment gets a *saved view*: an experiment tag ``mlflow.sharedViewState.<id>``
whose value is ``{"name", "createdAt", "updatedAt", "state"}``, ``state`` being the
UI's chart layout as a JSON string. The link from :func:`experiment_url` opens it in
the charts view of the "Model training" workflow (this UI build picks the workflow
from the URL, not from the ``mlflow.experimentKind`` tag). The view also shows up in
the page's "Views" menu.

How the UI uses the layout (checked against mlflow 3.17's bundled UI):

* sections are shown in the listed order, because ``isAccordionReordered`` is true;
* charts are shown in list order within their section; charts of metrics that have
  no values yet are hidden (the UI's default "hide empty charts");
* metrics that are not listed are merged in when the page loads: their charts are
  added to their prefix's section (appended at the end of ``test`` and ``train``,
  whose sections are marked reordered; in key order elsewhere), and a prefix that
  is not listed gets a new section after the listed ones;
* a listed section with no metric yet shows as an empty "(0)" section.

The link must carry no run-search parameters (``searchFilter``, ``orderByKey``, ...):
with any of them in the URL the UI ignores ``viewStateShareKey``.

The view applies while the link's ``viewStateShareKey`` is in the URL (a banner says
so); it does not change the layout the browser remembers for the experiment (kept in
localStorage): a plain link to the experiment keeps showing that one, unless the user
clicks "Override saved view" in the banner, which makes this layout the browser's own.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

TAG_PREFIX = "mlflow.sharedViewState."
VIEW_NAME = "irpo: test accuracy first"
TAG_VALUE_LIMIT = 20_000  # the UI's limit for a tag it writes; the server allows more

# Section order: per-iteration results first, then training, then the stage summaries.
# "Model metrics" (keys without "/", e.g. peak_rss_mb) and "System metrics" are the
# UI's own section names.
SECTIONS = ("test", "train", "eval", "rewards", "logps", "data", "label", "sample",
            "Model metrics", "System metrics")
# Charts pinned to the top of their section, in this order.
PINNED_CHARTS = ("test/accuracy", "test/maj_at_k", "train/loss")


def _section_uuid(name: str) -> str:
    return "irpo-section-" + name.lower().replace(" ", "-")


def _line_chart(key: str) -> dict:
    """A line chart of one metric against step, as the UI itself stores one."""
    section, _, display = key.rpartition("/")
    return {
        "uuid": "irpo-chart-" + key.replace("/", "-"),
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": _section_uuid(section or "Model metrics"),
        "deleted": False,
        "isGenerated": True,
        "displayName": display,
        "metricKey": key,
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def chart_state() -> dict:
    """The UI state the view sets (fields it leaves out take the UI's defaults)."""
    pinned_sections = {key.rpartition("/")[0] for key in PINNED_CHARTS}
    sections = [{"uuid": _section_uuid(name), "name": name, "display": True,
                 "isReordered": name in pinned_sections, "deleted": False,
                 "isGenerated": True} for name in SECTIONS]
    return {"compareRunCharts": [_line_chart(key) for key in PINNED_CHARTS],
            "compareRunSections": sections,
            "isAccordionReordered": True}


def chart_view_tag(view_id: str = "irpo-default") -> tuple[str, str]:
    """The (key, value) of the experiment tag that stores the saved view ``view_id``."""
    if not view_id or any(c in view_id for c in "/&#?% "):
        raise ValueError(f"view id {view_id!r} must be non-empty and URL-safe")
    now_ms = int(time.time() * 1000)
    value = json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
                        "state": json.dumps(chart_state(), separators=(",", ":"))},
                       separators=(",", ":"))
    assert len(value) <= TAG_VALUE_LIMIT
    return TAG_PREFIX + view_id, value


def experiment_url(base_url: str, experiment_id: str, view_id: str = "irpo-default") -> str:
    """The link that opens experiment ``experiment_id`` in the charts view with the view."""
    return (f"{base_url.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs"
            f"?viewStateShareKey={quote(view_id)}"
            "&workflowType=machine_learning&compareRunsMode=CHART")
