"""The task interface every benchmark implements, and its records.

A task owns its data, its prompt and its answer checker (one file per task, as
in nanochat's ``tasks/``). The loop only ever sees :class:`Example` records and
calls :meth:`Task.is_correct` on untrusted model text.

A task is a backend of the ``dataset`` group: its module declares its name, its schema
and its builder in :data:`irpo.config.TASKS` (found there without a list, irpo.registry),
and ``irpo.tasks.build_task`` looks the configured name up there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SPLITS = ("pretrain", "train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One problem. ``prompt`` is exactly what the model is conditioned on."""

    id: str
    question: str
    prompt: str
    gold_answer: str
    gold_cot: str | None = None  # a full gold response ending in the answer line


class Task(Protocol):
    name: str

    def load_split(self, split: str) -> list[Example]:
        """Examples of ``split`` (one of SPLITS); deterministic for a given config."""
        ...

    def extract_answer(self, response: str) -> str | None:
        """The final answer in a model response, or None. Must never raise."""
        ...

    def is_correct(self, response: str, gold_answer: str) -> bool:
        """Whether ``response`` ends in an answer equal to ``gold_answer``.

        ``response`` is untrusted model output: never evaluated, bounded in time,
        and any internal failure counts as incorrect.
        """
        ...
