"""Samplers: N completions per prompt from a checkpoint, behind one small protocol.

The loop never touches a generation library directly; it builds a sampler
from the config and calls :meth:`Sampler.generate`::

    sampler = build_sampler(cfg.sampler, model_path, dtype=cfg.model.dtype)
    try:
        outs = sampler.generate(prompts, n=8, temperature=1.0, max_new_tokens=96, seed=0)
    finally:
        sampler.close()
    outs[i][j].text   # j-th response to prompts[i]

Prompts are the tasks' raw ``Example.prompt`` strings; the backend applies
:func:`irpo.modeling.format_prompt` (the chat template, if any), so sampling
and training condition on identical token ids. Backends: ``hf``
(transformers ``generate``, CPU and tests) and ``vllm`` (irpo/sampling/vllm.py,
a class ``VLLMSampler`` with the same constructor, imported only when asked for).
Each backend's module declares its schema, name and builder in :data:`irpo.config.SAMPLERS`,
which finds the modules that do at its first lookup (irpo.registry).

Scoring given texts is an optional capability: a backend that has it is a :class:`Scorer`
(``score(prompts, responses)``: the summed log-prob of responses it did not sample, the
driver's gold CoT winners) and says, from its config, whether its scores are on
(:func:`can_score`); the driver asks this instead of reading config fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from irpo.config import SAMPLERS


@dataclass(frozen=True)
class Generation:
    text: str  # decoded response only (no prompt), special tokens stripped
    num_tokens: int  # generated tokens incl. EOS if produced
    finished: bool  # True if it ended with EOS (False: hit max_new_tokens)
    # Sum log-prob of encode_response(text) under the sampling model, when the
    # backend returns it (sampler=vllm, return_logprobs); None otherwise.
    logprob: float | None = None


class Sampler(Protocol):
    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int, desc: str = "sampling", first_index: int = 0) -> list[list[Generation]]:
        """``n`` responses per prompt, in prompt order; temperature 0 is greedy (n must be 1).

        ``first_index``: the global index of ``prompts[0]`` when a stage sends its prompts in
        chunks (irpo.chunks); the randomness of a prompt's samples depends on its global index.
        """
        ...

    def close(self) -> None:
        """Free the model (and any engine processes)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """A sampler that also scores texts it did not sample, as :attr:`Generation.logprob`."""

    def score(self, prompts: list[str], responses: list[str],
              desc: str = "scoring") -> list[float | None]:
        """Summed log-prob of each response after its prompt; None where it cannot."""
        ...

    @classmethod
    def scores(cls, sampler_cfg: Any) -> bool:
        """Whether a sampler built from ``sampler_cfg`` returns log-probs and scores texts."""
        ...


def sampler_class(name: str) -> type:
    """The class of sampler backend ``name`` (its module imported now, its engine not)."""
    return SAMPLERS.load(name)


def can_score(sampler_cfg: Any) -> bool:
    """Whether the configured sampler is a :class:`Scorer` whose scores are on."""
    cls = sampler_class(sampler_cfg.name)
    return issubclass(cls, Scorer) and cls.scores(sampler_cfg)


def build_sampler(sampler_cfg: Any, model_path: str, dtype: str = "float32") -> Sampler:
    """The sampler named ``sampler_cfg.name``, loaded with the checkpoint at ``model_path``."""
    return sampler_class(sampler_cfg.name)(model_path, sampler_cfg, dtype)


__all__ = ["Generation", "Sampler", "Scorer", "build_sampler", "can_score", "sampler_class"]
