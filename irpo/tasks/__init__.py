"""Benchmarks as tasks: ``build_task(dataset_cfg)`` returns the configured one.

Each task lives in its own module and registers itself on import; the modules
listed in ``_BUILTIN`` are imported on first use.
"""

from __future__ import annotations

import importlib

from irpo.tasks.base import SPLITS, Example, Task, register, registered
from irpo.tasks.base import build_task as _build

_BUILTIN = ("arith", "gsm8k", "math", "arc")


def _import_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(f"irpo.tasks.{module}")


def build_task(cfg) -> Task:
    _import_builtin()
    return _build(cfg)


__all__ = ["SPLITS", "Example", "Task", "build_task", "register", "registered"]
