"""The saved MLflow UI view (irpo.mlflow_view): its tag parses as the UI reads it, and a
sqlite tracking store takes it."""

from __future__ import annotations

import json

from irpo.mlflow_view import TAG_PREFIX, TAG_VALUE_LIMIT, chart_view_tag, experiment_url


def _ordered_keys(state: dict) -> list[str]:
    """Metric keys in the order the UI shows them: section by section, then list order."""
    charts = [c for c in state["compareRunCharts"] if not c["deleted"]]
    return [c["metricKey"] for s in state["compareRunSections"] if not s["deleted"]
            for c in charts if c["metricSectionId"] == s["uuid"]]


def test_tag_value_parses_and_puts_test_accuracy_first():
    key, value = chart_view_tag("irpo-default")
    assert key == TAG_PREFIX + "irpo-default"
    assert len(value) <= TAG_VALUE_LIMIT
    envelope = json.loads(value)
    # the UI's envelope check: string name, number createdAt, string state
    assert isinstance(envelope["name"], str) and envelope["name"]
    assert isinstance(envelope["createdAt"], int) and isinstance(envelope["updatedAt"], int)
    assert isinstance(envelope["state"], str)
    state = json.loads(envelope["state"])
    assert state["isAccordionReordered"] is True  # else the UI re-sorts sections by name
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections[0] == "test" and sections[1] == "train"
    section_ids = {s["uuid"] for s in state["compareRunSections"]}
    assert len(section_ids) == len(sections)
    assert _ordered_keys(state)[:3] == ["test/accuracy", "test/maj_at_k", "train/loss"]
    for chart in state["compareRunCharts"]:
        assert chart["type"] == "LINE" and chart["xAxisKey"] == "step"
        assert chart["metricSectionId"] in section_ids


def test_experiment_url_opens_the_view_in_the_charts_view():
    url = experiment_url("http://127.0.0.1:5000/", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=irpo-default"
                   "&workflowType=machine_learning&compareRunsMode=CHART")


def test_sqlite_store_takes_the_tag(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("view", artifact_location=(tmp_path / "art").as_uri())
    key, value = chart_view_tag()
    client.set_experiment_tag(exp_id, key, value)
    assert client.get_experiment(exp_id).tags[key] == value
