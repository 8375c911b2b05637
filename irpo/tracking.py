"""MLflow as a mirror of the run directory: each recorded (key, step) published once.

The run directory is the record (irpo.record); this module copies it to MLflow.
One MLflow run per run directory and tracking URI; its id is kept in the run
directory's ``tracking.json``, so a resumed run, or ``python -m irpo.sync``,
publishes into the same MLflow run. Publishing skips every (key, step) the
MLflow run already holds, so resuming after a kill at any moment, a redone
training stage or a second sync adds nothing twice.

All MLflow calls run in one background thread with bounded timeouts and
retries: a tracking server that is down never stops or slows the run. Its
metrics stay in the run directory and are published when the server answers
again, on the next resume, or by ``python -m irpo.sync RUN_DIR``.

Params are the resolved config flattened; tags carry what runs are grouped by
(method, dataset, beta, alpha, seed, git commit, config hash). Evaluation and
stage metrics use ``step = iteration``, training metrics ``step = global
training step``. The default store is sqlite under ``output_root``; open it
with ``mlflow ui --backend-store-uri sqlite:///<output_root>/mlflow.db``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from irpo.mlflow_view import chart_view_tag, experiment_url
from irpo.record import Metric

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in the run directory: run tags, and the MLflow run of each URI
# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this
# value opens the runs table and charts, the view a training comparison needs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_MAX_BATCH = 1000  # metrics per log_batch request (MLflow's limit)


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer at start and ``tracking.on_unavailable=fail``."""


class NullTracker:
    """``tracking=none``: the run directory alone keeps the metrics."""

    ui_hint = None

    def start(self, run_dir: Path, params: dict, tags: dict, run_name: str) -> None:
        pass

    def publish(self, metrics: Iterable[Metric]) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True

    def finish(self, status: str = "FINISHED", artifacts: Iterable[Path] = ()) -> bool:
        return True


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _store_lock(uri: str):
    from filelock import FileLock

    if uri.startswith("sqlite:///"):
        return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=600)
    return contextlib.nullcontext()


def default_tracking_uri(output_root: str) -> str:
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def run_label(resolved: dict) -> str:
    """The MLflow run name: what the run is, e.g. ``rpo β=0.1 α=16 seed=0``."""
    method = resolved["method"]
    parts = [method["name"]]
    # Run directories written before method.loss had booleans dpo and nll (irpo.sync reads them).
    loss = method.get("loss", "sigmoid" if method.get("dpo") else "none")
    weight = method.get("nll_weight", None if method.get("nll", True) else 0.0)
    if loss != "none":  # β belongs to the preference term
        parts.append(f"β={resolved['beta']:g}")
    if loss != "none" and weight is None:  # the NLL weight follows the alpha knob
        parts.append(f"α={resolved['alpha']:g}")
    parts.append(f"seed={resolved['seed']}")
    if resolved["dataset"]["name"] != "arith":
        parts.insert(0, resolved["dataset"]["name"])
    return " ".join(parts)


def run_tags(resolved: dict, run_dir: Path, config_hash: str) -> dict[str, str]:
    """The tags irpo.report groups by; written once into tracking.json, so a sync reuses them."""
    return {
        "method": resolved["method"]["name"], "dataset": resolved["dataset"]["name"],
        "model": resolved["model"]["name"], "beta": str(resolved["beta"]),
        "alpha": str(resolved["alpha"]), "seed": str(resolved["seed"]),
        "iterations": str(resolved["iterations"]), "git_commit": git_commit(),
        "run_dir": str(run_dir), "config_hash": config_hash, "gpus": str(_gpu_count()),
        **{k: str(v) for k, v in (resolved.get("tracking", {}).get("tags") or {}).items()},
    }


def read_tracking_file(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text()) if path.exists() else {"mlflow_runs": {}}


def write_tracking_file(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / TRACKING_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def bound_http_requests(timeout_s: float, retries: int) -> None:
    """MLflow reads these per request; its defaults retry a dead server for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


class MLflowTracker:
    """Publishes run-directory metrics to one MLflow run from a background thread."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path, settings):
        import mlflow  # imported here: slow, and unnecessary with tracking=none

        bound_http_requests(settings.timeout_s, settings.retries)
        self.uri, self.experiment, self.settings = uri, experiment, settings
        self.artifact_root = Path(artifact_root).resolve()
        self._mlflow = mlflow
        self.client = None  # made with the experiment (_experiment_id): it opens the store
        self.ui_hint = f"mlflow ui --backend-store-uri {uri}"
        self.run_id: str | None = None
        self.sent = 0  # metric values this tracker published (not counting those already there)
        self._exp_id: str | None = None
        self._published: set[tuple[str, int]] = set()
        self._pending: dict[tuple[str, int], Metric] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing: tuple[str, list[Path]] | None = None
        self._abandoned = False  # finish() stopped waiting: the thread ends too
        self._down_since: float | None = None  # when the store stopped answering
        self._next_try = 0.0  # while it is down: the next attempt (time.monotonic)
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the caller's side

    def connect(self) -> bool:
        """Find or create the experiment now (bounded); False, with one warning, if unreachable."""
        try:
            self._experiment_id()
            return True
        except Exception as err:  # noqa: BLE001 - any failure of the store means "down"
            line = f"MLflow at {self.uri} did not answer ({_short(err)})"
            if self.settings.on_unavailable == "fail":
                raise TrackingUnavailable(f"{line}; tracking.on_unavailable=fail") from None
            log.warning("%s: recording to the run directory only; its metrics are published "
                        "when the server answers, on resume, or with python -m irpo.sync", line)
            self._down_since = time.monotonic()
            self._next_try = self._down_since + self.settings.retry_every_s
            return False

    def start(self, run_dir: Path, params: dict, tags: dict, run_name: str) -> None:
        self._run_dir, self._params, self._tags, self._name = Path(run_dir), params, tags, run_name
        self._thread = threading.Thread(target=self._loop, name="mlflow-mirror", daemon=True)
        self._wake.set()  # open the MLflow run now, before the first metric
        self._thread.start()

    def publish(self, metrics: Iterable[Metric]) -> None:
        """Queue metrics for publishing; never blocks on the server."""
        with self._lock:
            for m in metrics:
                self._pending.setdefault((m.key, m.step), m)
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published (or ``timeout`` s); True if it was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and self.run_id is not None:
                    return True
            time.sleep(0.05)
        return False

    def finish(self, status: str = "FINISHED", artifacts: Iterable[Path] = ()) -> bool:
        """Publish what is left, attach ``artifacts``, set the run's status; wait at most
        ``tracking.flush_timeout_s``. False (and one warning) if the server did not take it all."""
        if self._thread is None:
            return True
        self._closing = (status, list(artifacts))
        self._wake.set()
        self._thread.join(self.settings.flush_timeout_s)
        if not self._thread.is_alive():
            return True
        self._abandoned = True
        self._wake.set()
        log.warning("MLflow at %s: %d metrics not published yet; they are in %s and "
                    "`python -m irpo.sync %s` publishes them", self.uri, len(self._pending),
                    self._run_dir, self._run_dir)
        return False

    # ---------------------------------------------------------------- the thread's side

    def _loop(self) -> None:
        while not self._abandoned:
            if self._down_since is not None and self._closing is None:
                # Down: new metrics do not bring the next attempt forward.
                self._wake.wait(max(0.0, self._next_try - time.monotonic()))
                self._wake.clear()
                if time.monotonic() < self._next_try and self._closing is None:
                    continue
            else:
                self._wake.wait()
                self._wake.clear()
            closing = self._closing  # read before the flush: it then sees all that was queued
            try:
                self._open_run()
                self._flush()
                if closing is not None:
                    self._terminate(*closing)
                    return
                if self._down_since is not None:
                    log.info("MLflow at %s answers again; published what was recorded meanwhile",
                             self.uri)
                    self._down_since = None
            except Exception as err:  # noqa: BLE001 - keep the run going whatever the store does
                if self._down_since is None:
                    log.warning("MLflow at %s: %s; the run goes on, its metrics stay in the run "
                                "directory and are published when the server answers",
                                self.uri, _short(err))
                    self._down_since = time.monotonic()
                self._next_try = time.monotonic() + self.settings.retry_every_s
                if self._closing is not None:
                    time.sleep(min(self.settings.retry_every_s, 2))
                    self._wake.set()  # retry until finish() stops waiting

    def _experiment_id(self) -> str:
        if self._exp_id is None:
            view_key, view = chart_view_tag()
            # The client opens its store when it is made, and a new sqlite store creates its
            # schema then: sweep points started together (SLURM array jobs) must not do that,
            # or create the experiment, at the same time.
            with _store_lock(self.uri):
                if self.client is None:
                    self.client = self._mlflow.MlflowClient(tracking_uri=self.uri)
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    self._exp_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_root.as_uri(),
                        tags={**EXPERIMENT_KIND, view_key: view})
                else:
                    self._exp_id = exp.experiment_id
                    if view_key not in exp.tags:  # an experiment made by an older irpo
                        self.client.set_experiment_tag(self._exp_id, view_key, view)
            server = self.uri.startswith(("http://", "https://"))
            link = experiment_url(self.uri if server else "http://127.0.0.1:5000", self._exp_id)
            self.ui_hint = link if server else f"mlflow ui --backend-store-uri {self.uri}, then open {link}"
        return self._exp_id

    def _open_run(self) -> None:
        """Resume this run directory's MLflow run in this store, or create it (once)."""
        if self.run_id is not None:
            return
        from mlflow.entities import Param

        self._experiment_id()  # the client, the store and the experiment first
        state = read_tracking_file(self._run_dir)
        entry = state["mlflow_runs"].get(self.uri) or _legacy_entry(self._run_dir)
        run = self._existing_run(entry["run_id"]) if entry else None
        if run is None:
            run = self.client.create_run(self._experiment_id(), tags=self._tags, run_name=self._name)
            entry = {"run_id": run.info.run_id, "params": False}
            state["mlflow_runs"][self.uri] = entry
            write_tracking_file(self._run_dir, state)
        if not entry["params"]:
            items = [Param(k, str(v)[:6000]) for k, v in self._params.items()]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params
                self.client.log_batch(run.info.run_id, params=items[i : i + 100])
            entry["params"] = True
            write_tracking_file(self._run_dir, state)
        self.client.update_run(run.info.run_id, status="RUNNING")
        self._published = self._history(run)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", self.run_id, self._name, self.uri)

    def _existing_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s is not in %s (deleted?); creating a new one", run_id, self.uri)
            return None

    def _history(self, run) -> set[tuple[str, int]]:
        """(key, step) of every metric value the MLflow run holds already."""
        return {(key, m.step) for key in run.data.metrics
                for m in self.client.get_metric_history(run.info.run_id, key)}

    def _flush(self) -> None:
        from mlflow.entities import Metric as MlflowMetric

        with self._lock:
            todo = [m for k, m in self._pending.items() if k not in self._published]
        for i in range(0, len(todo), _MAX_BATCH):
            chunk = todo[i : i + _MAX_BATCH]
            self.client.log_batch(self.run_id, metrics=[
                MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in chunk])
            with self._lock:
                self.sent += len(chunk)
                for m in chunk:
                    self._published.add((m.key, m.step))
                    self._pending.pop((m.key, m.step), None)
        with self._lock:  # what was queued but published earlier (a resume, a redone stage)
            for k in [k for k in self._pending if k in self._published]:
                del self._pending[k]

    def _terminate(self, status: str, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


def _legacy_entry(run_dir: Path) -> dict | None:
    """Run directories written before tracking.json kept the run id in ``mlflow_run_id``."""
    old = Path(run_dir) / "mlflow_run_id"
    return {"run_id": old.read_text().strip(), "params": True} if old.exists() else None


def _short(err: BaseException) -> str:
    """One line of an exception: MLflow's HTTP errors run to a page of retry history."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def build_tracker(tcfg, output_root: str):
    """The tracker of ``tracking`` settings; connects (bounded) before any run directory exists."""
    if tcfg.backend == "none":
        return NullTracker()
    uri = tcfg.tracking_uri or default_tracking_uri(output_root)
    tracker = MLflowTracker(uri, tcfg.experiment_name, Path(output_root) / "mlartifacts", tcfg)
    tracker.connect()
    return tracker
