"""Helpers for the tests of the real-data tasks (imported by tests/test_task_*.py).

The real data is ``$IRPO_DATA_DIR`` or ``shared/data`` next to the repository (where CI lays
it); tests that need it skip, saying so, when it is absent.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

from irpo.tasks import build_task
from irpo.tasks.__main__ import dataset_config

DATA = Path(os.environ.get("IRPO_DATA_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")

needs_data = pytest.mark.skipif(
    not (DATA / "gsm8k" / "train.jsonl").is_file(),
    reason=f"real benchmark data not found at {DATA}; set IRPO_DATA_DIR to a copy of shared/data",
)


def make_task(name: str, **overrides):
    """The task as ``dataset=<name>`` configures it, reading the real data, with overrides."""
    cfg = dataset_config(name, str(DATA))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return build_task(cfg)


@cache
def cached_task(name: str):
    """One shared instance per task name (loading MATH takes ~0.5 s)."""
    return make_task(name)


def by_id(examples, example_id: str):
    return next(ex for ex in examples if ex.id == example_id)
