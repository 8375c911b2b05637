"""Trainer backends by name. Each takes the same arguments and returns the
same stage summary (see irpo.training.torch_trainer.train)."""

from __future__ import annotations

from typing import Callable


def get_trainer(name: str) -> Callable:
    if name == "torch":
        from irpo.training.torch_trainer import train

        return train
    if name == "deepspeed":
        from irpo.training.deepspeed_trainer import train

        return train
    raise ValueError(f"trainer.name={name!r} is not a known trainer backend; known: torch, deepspeed")
