"""irpo.summary: the per-iteration table a run prints and saves as summary.md.

Built from stage DONE markers written here with known values; the expected rows and the
table are written out by hand. A stage that has not finished (a run stopped in iteration 2)
shows as "-", and a resumed run's table equals the uninterrupted one because only DONE
markers are read.
"""

from __future__ import annotations

import math

from irpo.rundir import RunDir, write_json_atomic
from irpo.summary import iteration_rows, render_table

DONE = {
    (0, "eval"): {"test/accuracy": 0.294, "test/maj_at_k": 0.26, "wall_s": 39.04},
    (1, "sample"): {"wall_s": 33.26},
    (1, "label"): {"frac_correct": 0.2109, "wall_s": 0.71},
    (1, "data"): {"data_examples": 1959, "data_prompts": 1024, "wall_s": 0.2},
    (1, "train"): {"chosen_delta_end": 0.344, "rejected_delta_end": -2.251, "steps": 123,
                   "wall_s": 41.5},
    (1, "eval"): {"test/accuracy": 0.311, "test/maj_at_k": 0.296, "wall_s": 32.49},
    (2, "sample"): {"wall_s": 34.0},  # stopped after iteration 2's sampling
}


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path)
    for (t, stage), info in DONE.items():
        run.stage_dir(t, stage).mkdir(parents=True)
        write_json_atomic(run.stage_dir(t, stage) / "DONE", info)
    (tmp_path / "iter2" / "label.tmp").mkdir()  # an unfinished stage is not read
    return run


def test_rows_come_from_done_markers_only(tmp_path):
    rows = iteration_rows(make_run(tmp_path), iterations=2)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    r0, r1, r2 = rows
    assert (r0["test_acc"], r0["maj"], r0["eval_s"]) == (0.294, 0.26, 39.04)
    assert all(math.isnan(r0[k]) for k in ("frac_correct", "examples", "chosen_delta", "train_s"))
    assert (r1["frac_correct"], r1["examples"], r1["chosen_delta"], r1["rejected_delta"]) == (
        0.2109, 1959, 0.344, -2.251)
    assert (r1["sample_s"], r1["label_s"], r1["data_s"], r1["train_s"], r1["eval_s"]) == (
        33.26, 0.71, 0.2, 41.5, 32.49)
    assert r2["sample_s"] == 34.0 and math.isnan(r2["test_acc"]) and math.isnan(r2["label_s"])


def test_table_renders_each_value_and_dashes_for_missing_ones(tmp_path):
    table = render_table(iteration_rows(make_run(tmp_path), iterations=2), maj_k=4)
    assert table.splitlines() == [
        ("| iter | test acc | maj@4 | correct samples | train examples | Δlogp chosen | Δlogp rejected"
         " | sample s | label s | data s | train s | eval s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| 0 | 0.294 | 0.260 | - | - | - | - | - | - | - | - | 39.0 |",
        "| 1 | 0.311 | 0.296 | 0.211 | 1959 | +0.34 | -2.25 | 33.3 | 0.7 | 0.2 | 41.5 | 32.5 |",
        "| 2 | - | - | - | - | - | - | 34.0 | - | - | - | - |",
    ]


def test_table_without_maj_at_k(tmp_path):
    run = RunDir(tmp_path)
    run.stage_dir(0, "eval").mkdir(parents=True)
    write_json_atomic(run.stage_dir(0, "eval") / "DONE", {"test/accuracy": 0.5, "wall_s": 1.0})
    (row,) = iteration_rows(run, iterations=0)
    assert math.isnan(row["maj"])
    assert render_table([row], maj_k=0).splitlines()[2] == (
        "| 0 | 0.500 | - | - | - | - | - | - | - | - | - | 1.0 |")
