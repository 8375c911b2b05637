"""Benchmarks as tasks: ``build_task(dataset_cfg)`` returns the configured one.

Each task lives in its own module, which declares its name, schema and builder in
:data:`irpo.config.TASKS`; the registry finds the modules that do at its first lookup
(irpo.registry), so a new task is its module and its ``conf/dataset`` option.
"""

from __future__ import annotations

from typing import Any

from irpo.config import TASKS
from irpo.tasks.base import SPLITS, Example, Task


def build_task(cfg: Any) -> Task:
    """The task named ``cfg.name``, built from its dataset config."""
    return TASKS.load(cfg.name)(cfg)


__all__ = ["SPLITS", "Example", "Task", "build_task"]
