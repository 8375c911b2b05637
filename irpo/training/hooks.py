"""Callbacks at fixed points of a training stage, for code that watches the real trainer.

Both trainers take them (irpo.training.torch_trainer.train; in the DeepSpeed workers,
irpo.training.deepspeed_trainer.worker), so a benchmark times the trainer the driver runs
instead of a copy of it or a monkeypatched one::

    marks = []
    hooks = StageHooks(on_reference=lambda phase: marks.append((phase, time.perf_counter())),
                       on_step=lambda step, metrics: marks.append((step, time.perf_counter())))
    torch_trainer.train(cfg, init_path, examples, out_dir, log_metrics, 0, seed, hooks=hooks)

Called in the process that trains (in every DeepSpeed rank), synchronously: what a hook
costs is part of the stage. A hook must not change the model or the batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageHooks:
    # "start" just before the stage's reference log-probs are computed, "end" when they
    # are ready (after the sampler's values are taken and any check is done). Not called
    # when the stage needs no reference or takes it from a resumed step checkpoint.
    on_reference: Callable[[str], None] | None = None
    # After every optimiser step (not only the logged ones), after its metrics are
    # logged and before any checkpoint of that step is saved: (the stage's step, counting
    # from 1; the step's metrics, as log_metrics gets them).
    on_step: Callable[[int, dict[str, float]], None] | None = None

    def reference(self, phase: str) -> None:
        if self.on_reference is not None:
            self.on_reference(phase)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.on_step is not None:
            self.on_step(step, metrics)


NO_HOOKS = StageHooks()
