"""irpo.tracking's helpers, each on its own: params, tags, tracking.json, error lines, settings.

test_tracking.py covers the mirror on a real store; these are the small functions every
run goes through, with expected values written out by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from irpo import tracking
from irpo.tracking import (
    NullTracker,
    _legacy_entry,
    _short,
    bound_http_requests,
    build_tracker,
    default_tracking_uri,
    flatten,
    read_tracking_file,
    run_tags,
    write_tracking_file,
)

REPO = Path(__file__).resolve().parents[1]


def test_flatten_joins_nested_keys_with_dots():
    nested = {"beta": 0.1, "trainer": {"lr": 3e-4, "opt": {"eps": 1e-8}}, "temperature": [1.0, 0.8],
              "empty": {}, "none": None}
    assert flatten(nested) == {"beta": 0.1, "trainer.lr": 3e-4, "trainer.opt.eps": 1e-8,
                               "temperature": [1.0, 0.8], "none": None}
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1}


def resolved(**extra) -> dict:
    return {"method": {"name": "rpo"}, "dataset": {"name": "gsm8k"}, "model": {"name": "tiny"},
            "beta": 0.1, "alpha": 4.0, "seed": 2, "iterations": 3, **extra}


def test_run_tags_hold_what_reports_group_by(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_gpu_count", lambda: 0)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip()
    tags = run_tags(resolved(tracking={"tags": {"sweep": "table1", "n": 5}}), tmp_path, "abc123")
    assert tags == {"method": "rpo", "dataset": "gsm8k", "model": "tiny", "beta": "0.1",
                    "alpha": "4.0", "seed": "2", "iterations": "3", "git_commit": head,
                    "run_dir": str(tmp_path), "config_hash": "abc123", "gpus": "0",
                    "sweep": "table1", "n": "5"}
    assert all(isinstance(v, str) for v in tags.values())  # MLflow tags are strings
    assert "sweep" not in run_tags(resolved(), tmp_path, "abc123")


def test_git_commit_is_unknown_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(tracking.subprocess, "run", no_git)
    assert tracking.git_commit() == "unknown"


def test_tracking_file_round_trip_and_default(tmp_path):
    assert read_tracking_file(tmp_path) == {"mlflow_runs": {}}
    state = {"tags": {"method": "rpo"}, "mlflow_runs": {"sqlite:///x.db": {"run_id": "r1"}}}
    write_tracking_file(tmp_path, state)
    assert read_tracking_file(tmp_path) == state
    assert json.loads((tmp_path / "tracking.json").read_text()) == state
    assert not (tmp_path / "tracking.json.tmp").exists()  # written atomically


def test_legacy_run_id_file_is_read(tmp_path):
    assert _legacy_entry(tmp_path) is None
    (tmp_path / "mlflow_run_id").write_text("0123abcd\n")
    assert _legacy_entry(tmp_path) == {"run_id": "0123abcd", "params": True}


def test_short_error_is_one_line_of_at_most_200_characters():
    assert _short(ValueError("no\n  such   store")) == "ValueError: no such store"
    long = _short(ConnectionError("retry " * 100))
    assert long.startswith("ConnectionError: retry retry") and long.endswith("...")
    assert len(long) == len("ConnectionError: ") + 200 + 3 and "\n" not in long


def test_http_requests_are_bounded(monkeypatch):
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    bound_http_requests(0.3, 2)  # MLflow takes whole seconds: at least 1
    assert (os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"], os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"],
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) == ("1", "2", "1")
    bound_http_requests(7.6, 0)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "8"


@dataclass
class Off:
    backend: str = "none"


def test_tracking_none_records_nothing_and_never_fails(tmp_path):
    tracker = build_tracker(Off(), str(tmp_path))
    assert isinstance(tracker, NullTracker)
    tracker.start(tmp_path, {"beta": 0.1}, {"method": "rpo"}, "rpo")
    tracker.publish([])
    assert tracker.flush(timeout=0) and tracker.finish("FAILED")
    assert list(tmp_path.iterdir()) == []  # no store, no files


def test_default_store_is_sqlite_under_the_output_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("outputs") == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert default_tracking_uri("/abs/out") == "sqlite:////abs/out/mlflow.db"
