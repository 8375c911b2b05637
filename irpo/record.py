"""The run directory's record of every metric a run produces.

The run directory, not the tracking server, is the record: a metric is written
here first, and :mod:`irpo.tracking` publishes what is here (each (key, step)
once) to MLflow. So ``tracking=none`` keeps every curve, a run killed between
two writes loses nothing, and ``python -m irpo.sync`` can publish a run
afterwards. Three places hold metrics:

* ``iter<t>/<stage>/DONE``: a stage's summary, written when the stage is
  committed (irpo.rundir). Its numbers are published at step t under
  ``<stage>/<key>`` (keys that already hold a ``/``, such as ``test/accuracy``,
  as they are).
* ``iter<t>/train/metrics.jsonl``: training metrics per logged step (global
  step), appended while the stage runs into ``train.tmp/`` and committed with
  it. One line per step: ``{"step": 12, "time": <ms>, "metrics": {...}}``.
* ``summary.json``: what the finished run measured about itself (peak RSS),
  at step = the number of iterations.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

STEP_METRICS = "metrics.jsonl"
RUN_SUMMARY = "summary.json"
_ITER_DIR = re.compile(r"iter(\d+)")


@dataclass(frozen=True)
class Metric:
    """One metric value as MLflow takes it (timestamp in milliseconds)."""

    key: str
    value: float
    step: int
    timestamp: int


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_metrics(stage: str, info: dict, step: int, timestamp: int) -> list[Metric]:
    """A stage summary's finite numbers, named ``<stage>/<key>`` unless the key has a ``/``."""
    return [Metric(k if "/" in k else f"{stage}/{k}", float(v), step, timestamp)
            for k, v in info.items() if numeric(v) and math.isfinite(v)]


def step_records(path: Path) -> list[Metric]:
    """The metrics of a stage's ``metrics.jsonl``; a half-written last line is ignored."""
    out: list[Metric] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # only the last line can be cut short by a kill
        out += [Metric(k, float(v), int(rec["step"]), int(rec["time"]))
                for k, v in rec["metrics"].items() if numeric(v) and math.isfinite(v)]
    return out


class StepLog:
    """Append-only per-step metrics of one stage (``<stage>.tmp/metrics.jsonl``).

    Each line is flushed when written, so a step that was published before a kill
    is on disk too. A training stage that resumes from a step checkpoint redoes the
    steps after it: the first redone step cuts the file back to the steps before it.
    """

    def __init__(self, stage_dir: Path):
        self.path = Path(stage_dir) / STEP_METRICS
        self._last = max((m.step for m in step_records(self.path)), default=0)

    def append(self, metrics: dict[str, float], step: int) -> list[Metric]:
        if step <= self._last:
            self._cut_before(step)
        self._last = step
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": now, "metrics": values}) + "\n")
        return [Metric(k, v, step, now) for k, v in values.items() if math.isfinite(v)]

    def _cut_before(self, step: int) -> None:
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < step:
                    keep.append(line + "\n")
            except json.JSONDecodeError:
                pass  # a line cut short by the kill
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(self.path)


def stage_record(stage_dir: Path, iteration: int) -> list[Metric]:
    """Everything a committed stage recorded: its summary and its per-step metrics."""
    done = stage_dir / "DONE"
    if not done.exists():
        return []
    stamp = int(done.stat().st_mtime * 1000)
    info = json.loads(done.read_text())
    return summary_metrics(stage_dir.name, info, iteration, stamp) + step_records(stage_dir / STEP_METRICS)


def write_run_summary(run_dir: Path, metrics: dict[str, float], step: int) -> list[Metric]:
    """Record the finished run's own metrics once; a rerun of a finished run keeps the first."""
    path = Path(run_dir) / RUN_SUMMARY
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"step": step, "time": int(time.time() * 1000), "metrics": metrics}))
        tmp.replace(path)
    return run_summary(run_dir)


def run_summary(run_dir: Path) -> list[Metric]:
    path = Path(run_dir) / RUN_SUMMARY
    if not path.exists():
        return []
    rec = json.loads(path.read_text())
    return [Metric(k, float(v), int(rec["step"]), int(rec["time"])) for k, v in rec["metrics"].items()]


def run_record(run_dir: Path) -> list[Metric]:
    """Every metric the run directory holds, iteration by iteration (unfinished stages excluded)."""
    run_dir = Path(run_dir)
    out: list[Metric] = []
    iters = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if p.is_dir() and (m := _ITER_DIR.fullmatch(p.name)))
    for t, folder in iters:
        dones = sorted(folder.glob("*/DONE"), key=lambda d: d.stat().st_mtime)
        for done in dones:
            if not done.parent.name.endswith(".tmp"):
                out += stage_record(done.parent, t)
    return out + run_summary(run_dir)
