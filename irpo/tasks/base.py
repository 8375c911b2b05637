"""The task interface every benchmark implements, and the task registry.

A task owns its data, its prompt and its answer checker (one file per task, as
in nanochat's ``tasks/``). The loop only ever sees :class:`Example` records and
calls :meth:`Task.is_correct` on untrusted model text.

Tasks register themselves with :func:`register`; ``irpo.tasks.build_task``
looks the configured name up, so adding a benchmark means adding one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

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


TaskBuilder = Callable[[Any], Task]
_REGISTRY: dict[str, TaskBuilder] = {}


def register(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def deco(builder: TaskBuilder) -> TaskBuilder:
        _REGISTRY[name] = builder
        return builder

    return deco


def registered() -> list[str]:
    return sorted(_REGISTRY)


def build_task(cfg: Any) -> Task:
    """Build the task named ``cfg.name`` from its dataset config."""
    try:
        builder = _REGISTRY[cfg.name]
    except KeyError:
        raise ValueError(
            f"dataset.name={cfg.name!r} is not a known task; known: {', '.join(registered())}"
        ) from None
    return builder(cfg)
