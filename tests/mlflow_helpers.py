"""Test helpers: a real ``mlflow server`` on 127.0.0.1, and metric histories to compare.

A history maps each metric key to its list of (step, value) in logging order, so a
value logged twice shows up twice. The run directory's record (irpo.record) is read
with its own small parser here, not through the code under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Keys whose values are timings or memory: they differ between two runs of one config.
TIMING_KEYS = ("wall_s", "gold_scoring_s", "peak_rss_mb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` over a sqlite store in ``root``; stop() and start() keep the store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--default-artifact-root", (self.root / "artifacts").as_uri(), "--workers", "1"]
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)  # the whole session: uvicorn's workers too
            self.proc.wait(timeout=30)
        self.proc = None


def mlflow_history(uri: str, experiment: str = "irpo") -> dict[str, dict]:
    """{run name: {"status", "tags", "metrics": {key: [(step, value), ...]}}} of an experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        metrics = {}
        for key in run.data.metrics:
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            metrics[key] = [(m.step, m.value) for m in hist]
        out[run.info.run_name] = {"status": run.info.status, "tags": run.data.tags, "metrics": metrics}
    return out


def recorded_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the run directory records: DONE summaries at step t, step files, summary.json."""
    out: dict[str, list] = {}

    def add(key, step, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(key, []).append((step, float(value)))

    for done in run_dir.glob("iter*/*/DONE"):
        t, stage = int(done.parent.parent.name[4:]), done.parent.name
        for k, v in json.loads(done.read_text()).items():
            add(k if "/" in k else f"{stage}/{k}", t, v)
        steps = done.parent / "metrics.jsonl"
        for line in steps.read_text().splitlines() if steps.exists() else []:
            rec = json.loads(line)
            for k, v in rec["metrics"].items():
                add(k, rec["step"], v)
    summary = run_dir / "summary.json"
    if summary.exists():
        rec = json.loads(summary.read_text())
        for k, v in rec["metrics"].items():
            add(k, rec["step"], v)
    return {k: sorted(v) for k, v in out.items()}


def comparable(history: dict[str, list]) -> dict[str, list]:
    """Timings and memory reduced to their steps: they are measured, not computed."""
    return {k: ([s for s, _ in v] if k.endswith(TIMING_KEYS) else v) for k, v in history.items()}


def assert_each_once(history: dict[str, list]) -> None:
    for key, points in history.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: steps logged more than once: {steps}"
