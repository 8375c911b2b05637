"""Experiment tracking: MLflow, or nothing.

One MLflow run per experiment (per sweep point). Its id is stored in the run
directory, so a resumed run keeps logging into the same MLflow run. Params are
the resolved config flattened; tags carry what runs are grouped by (method,
dataset, beta, alpha, seed, git commit). Evaluation metrics use
``step = iteration``, training metrics ``step = global training step``.

The default store is sqlite under ``output_root``; open it with
``mlflow ui --backend-store-uri sqlite:///<output_root>/mlflow.db``.
"""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    ui_hint: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    ui_hint = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


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
    import contextlib

    from filelock import FileLock

    if uri.startswith("sqlite:///"):
        return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=600)
    return contextlib.nullcontext()


def default_tracking_uri(output_root: str) -> str:
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


class MLflowTracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path, run_dir: Path,
                 params: dict[str, Any], tags: dict[str, str]):
        import mlflow  # imported here: slow, and unnecessary with tracking=none

        self._mlflow = mlflow
        self.ui_hint = f"mlflow ui --backend-store-uri {uri}"
        # Sweep points started together (SLURM array jobs) would race to create
        # the sqlite schema and the experiment; one of them would crash.
        with _store_lock(uri):
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=artifact_root.resolve().as_uri()
            )
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("resuming MLflow run %s", self.run_id)
        else:
            run = self.client.create_run(exp_id, tags=tags, run_name=run_dir.name)
            self.run_id = run.info.run_id
            items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params
                self.client.log_batch(self.run_id, params=items[i : i + 100])
            id_file.write_text(self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def build_tracker(cfg, run_dir: Path, resolved: dict) -> Tracker:
    if cfg.tracking.backend == "none":
        return NullTracker()
    uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.output_root)
    tags = {
        "method": cfg.method.name, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "beta": str(cfg.beta), "alpha": str(cfg.alpha), "seed": str(cfg.seed),
        "iterations": str(cfg.iterations), "git_commit": git_commit(),
        "run_dir": str(run_dir), "gpus": str(_gpu_count()),
        **cfg.tracking.tags,
    }
    artifact_root = Path(cfg.output_root) / "mlartifacts"
    return MLflowTracker(uri, cfg.tracking.experiment_name, artifact_root, run_dir,
                         flatten(resolved), tags)
