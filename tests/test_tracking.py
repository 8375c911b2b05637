"""The record (irpo.record) and its MLflow mirror (irpo.tracking) on a real sqlite store.

End-to-end kills and a real server's outages are in test_faults.py; here the mirror's
own rules: each (key, step) once across tracker instances, publishing never blocks and
catches up after errors, and run names say what the run is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest

from irpo.record import Metric, StepLog, run_record, step_records, summary_metrics
from irpo.tracking import MLflowTracker, TrackingUnavailable, run_label


@dataclass
class Settings:
    on_unavailable: str = "continue"
    timeout_s: float = 2.0
    retries: int = 0
    retry_every_s: float = 0.2
    flush_timeout_s: float = 20.0


def history(uri: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("irpo").experiment_id])
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def tracker_for(tmp_path, settings=None) -> MLflowTracker:
    t = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "irpo", tmp_path / "art", settings or Settings())
    assert t.connect()
    t.start(tmp_path / "run", {"beta": 0.1}, {"method": "rpo"}, "rpo β=0.1 α=4 seed=0")
    return t


def test_each_key_and_step_is_published_once_across_attempts(tmp_path):
    (tmp_path / "run").mkdir()
    first = tracker_for(tmp_path)
    first.publish([Metric("train/loss", 0.7, 1, 1000), Metric("train/loss", 0.6, 2, 2000)])
    first.publish([Metric("train/loss", 0.9, 2, 3000)])  # same step again: the first value stays
    assert first.flush(20)
    assert first.finish("FAILED")
    # A second attempt (a resume) publishes its whole record again, plus new steps.
    second = tracker_for(tmp_path)
    second.publish([Metric("train/loss", 0.7, 1, 1000), Metric("train/loss", 0.6, 2, 2000),
                    Metric("train/loss", 0.5, 3, 4000), Metric("test/accuracy", 0.25, 0, 5000)])
    assert second.finish("FINISHED")
    assert second.run_id == first.run_id and second.sent == 2
    assert history(f"sqlite:///{tmp_path / 'mlflow.db'}") == {
        "train/loss": [(1, 0.7), (2, 0.6), (3, 0.5)], "test/accuracy": [(0, 0.25)]}
    state = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert state["mlflow_runs"][f"sqlite:///{tmp_path / 'mlflow.db'}"] == {"run_id": first.run_id,
                                                                            "params": True}


def test_a_failing_store_never_blocks_and_is_caught_up(tmp_path):
    (tmp_path / "run").mkdir()
    tracker = tracker_for(tmp_path)
    assert tracker.flush(20)  # the run is open
    real, failures = tracker.client.log_batch, []

    def flaky(*args, **kwargs):
        if len(failures) < 3:
            failures.append(time.monotonic())
            time.sleep(0.5)  # a slow, failing server
            raise OSError("store unwritable")
        return real(*args, **kwargs)

    tracker.client.log_batch = flaky
    start = time.monotonic()
    for step in range(1, 21):
        tracker.publish([Metric("train/loss", 1.0 / step, step, step)])
    assert time.monotonic() - start < 0.2  # queued, not sent in the caller's thread
    assert tracker.finish("FINISHED")
    assert len(failures) == 3
    assert history(f"sqlite:///{tmp_path / 'mlflow.db'}") == {
        "train/loss": [(s, 1.0 / s) for s in range(1, 21)]}


def test_unreachable_server_fails_in_one_line_or_continues(tmp_path):
    uri = "http://127.0.0.1:9"  # discard port: nothing answers
    with pytest.raises(TrackingUnavailable, match=r"^MLflow at http://127.0.0.1:9 did not answer \("):
        MLflowTracker(uri, "irpo", tmp_path, Settings(on_unavailable="fail")).connect()
    start = time.monotonic()
    assert MLflowTracker(uri, "irpo", tmp_path, Settings()).connect() is False
    assert time.monotonic() - start < 10


def test_step_log_and_records(tmp_path):
    log = StepLog(tmp_path)
    got = log.append({"train/loss": 0.5, "train/lr": 1e-3, "bad": float("nan")}, 7)
    assert [(m.key, m.value, m.step) for m in got] == [("train/loss", 0.5, 7), ("train/lr", 1e-3, 7)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "time": 1, "metr')  # a kill in the middle of a line
    assert [(m.key, m.step) for m in step_records(tmp_path / "metrics.jsonl")] == [
        ("train/loss", 7), ("train/lr", 7)]
    assert [(m.key, m.value) for m in summary_metrics(
        "eval", {"test/accuracy": 0.5, "wall_s": 3, "ok": True, "name": "x"}, 2, 0)] == [
        ("test/accuracy", 0.5), ("eval/wall_s", 3.0)]


def test_run_record_reads_committed_stages_only(tmp_path):
    for stage, info in (("iter0/eval", {"test/accuracy": 0.25}), ("iter1/train", {"steps": 2})):
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / "DONE").write_text(json.dumps(info))
    StepLog(tmp_path / "iter1/train").append({"train/loss": 0.5}, 1)
    (tmp_path / "iter1/eval.tmp").mkdir()  # in flight: no DONE, nothing recorded
    StepLog(tmp_path / "iter1/eval.tmp").append({"x": 1.0}, 1)
    assert sorted((m.key, m.step, m.value) for m in run_record(tmp_path)) == [
        ("test/accuracy", 0, 0.25), ("train/loss", 1, 0.5), ("train/steps", 1, 2.0)]


@pytest.mark.parametrize("method,dataset,want", [
    ({"name": "rpo", "loss": "sigmoid", "nll_weight": None}, "arith", "rpo β=0.1 α=4 seed=0"),
    ({"name": "dpo", "loss": "sigmoid", "nll_weight": 0.0}, "arith", "dpo β=0.1 seed=0"),
    ({"name": "sft", "loss": "none", "nll_weight": 1.0}, "gsm8k", "gsm8k sft seed=0"),
    ({"name": "ipo", "loss": "ipo", "nll_weight": None}, "arith", "ipo β=0.1 α=4 seed=0"),
    # run directories from before method.loss (python -m irpo.sync reads them): the same labels
    ({"name": "rpo", "dpo": True, "nll": True}, "arith", "rpo β=0.1 α=4 seed=0"),
    ({"name": "dpo", "dpo": True, "nll": False}, "arith", "dpo β=0.1 seed=0"),
    ({"name": "sft", "dpo": False, "nll": True}, "gsm8k", "gsm8k sft seed=0"),
])
def test_run_label(method, dataset, want):
    resolved = {"method": method, "dataset": {"name": dataset}, "beta": 0.1, "alpha": 4.0, "seed": 0}
    assert run_label(resolved) == want


def test_experiment_opens_on_the_charts_view_with_test_accuracy_first(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("old", artifact_location=tmp_path.as_uri())
    for name in ("irpo", "old"):  # created by the tracker; made before the view existed
        tracker = MLflowTracker(uri, name, tmp_path / "art", Settings())
        assert tracker.connect()
        tags = MlflowClient(tracking_uri=uri).get_experiment_by_name(name).tags
        view = json.loads(json.loads(tags["mlflow.sharedViewState.irpo-default"])["state"])
        assert view["compareRunCharts"][0]["metricKey"] == "test/accuracy"
        assert tracker.ui_hint.endswith(f"#/experiments/{tracker._exp_id}/runs?viewStateShareKey="
                                        "irpo-default&workflowType=machine_learning&compareRunsMode=CHART")
    assert tags.get("mlflow.experimentKind") is None  # only experiments the tracker creates
