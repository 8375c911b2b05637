"""Trainer backends by name (:data:`irpo.config.TRAINERS`, declared by their own modules:
``torch_trainer``, ``deepspeed_trainer``). Each takes the same arguments and returns the
same stage summary (see irpo.training.torch_trainer.train)."""

from __future__ import annotations

from collections.abc import Callable

from irpo.config import TRAINERS


def get_trainer(name: str) -> Callable:
    """The ``train`` function of trainer backend ``name``, imported now."""
    return TRAINERS.load(name)
