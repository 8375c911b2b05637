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
``VLLMSampler`` also has ``score(prompts, responses)``: the summed log-prob of responses
it did not sample (the driver's gold CoT winners).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol


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


# name -> "module:Class". Imported lazily so that the hf backend never needs vllm.
_BACKENDS: dict[str, str] = {
    "hf": "irpo.sampling.hf:HFSampler",
    "vllm": "irpo.sampling.vllm:VLLMSampler",
}


def build_sampler(sampler_cfg: Any, model_path: str, dtype: str = "float32") -> Sampler:
    """The sampler named ``sampler_cfg.name``, loaded with the checkpoint at ``model_path``."""
    try:
        target = _BACKENDS[sampler_cfg.name]
    except KeyError:
        raise ValueError(
            f"sampler.name={sampler_cfg.name!r} is not a known sampler; known: {', '.join(_BACKENDS)}"
        ) from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"sampler={sampler_cfg.name} needs {module_name}: {err}") from err
    return getattr(module, class_name)(model_path, sampler_cfg, dtype)


__all__ = ["Generation", "Sampler", "build_sampler"]
