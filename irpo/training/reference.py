"""Reference log-probs of a training stage: the sampler's where it gave them, a forward for the rest.

M(t-1) generated the samples of iteration t and is the reference of its training
(the same model). With ``sampler.return_logprobs`` (sampler=hf's default; sampler=vllm
when set) the sampler returns
the summed log-prob of each response it can vouch for; irpo.pairs carries them into the
pairs (``chosen_ref_logprob``, ``rejected_ref_logprob``) and irpo.training.data onto the
TokenizedExample (``chosen_ref``, ``rejected_ref``; dropped for a response cut to the
context). :func:`stage_reference`, called by both trainers before the first update, runs
the reference forward only where one is missing (``trainer.sampler_ref_logprobs``; off:
everything is recomputed, as before):

* pairs with neither response known (no sampler log-probs): scored as pairs, in order, by
  the trainer's own pass (the torch trainer's shared-prefix forward, DeepSpeed's sharded one);
* pairs with one known (a sample cut at max_new_tokens; a gold CoT winner the sampler
  did not score: irpo.driver.score_gold does, except with ``sampler.nodes`` > 1): the
  unknown response alone, as a single-sequence row, once per distinct prompt and response
  (a gold CoT is in every pair of its prompt);
* nothing, when every response is known.

Usage (``score(examples) -> (chosen, rejected or None)`` is the trainer's reference pass)::

    (ref_chosen, ref_rejected), info = stage_reference(toks, score, cfg.trainer, ids, seed)

``info`` joins the stage summary (``ref_rows_from_sampler``, ``ref_rows_computed``,
``ref_logprob_check_max_abs_diff``, ...), which the driver logs as ``train/<key>``.

The agreement check (``trainer.ref_check_pairs``, 0 disables): a seeded random subset of
the pairs with a sampler reference is scored again; a difference above
``trainer.ref_check_tolerance`` fails the stage naming the pair. A wrong reference shifts
the DPO margin of its pair by beta x the error, silently, so it is worth a few forwards;
the usual causes are a sampler run on another checkpoint or dtype, or tokenisation that
differs between sampler and trainer.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

import torch

from irpo.training.data import TokenizedExample

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[TokenizedExample]], tuple[torch.Tensor, torch.Tensor | None]]

class ReferenceMismatch(RuntimeError):
    """A sampler reference log-prob disagrees with the recomputed forward; the message names the pair."""


def given_references(toks: list[TokenizedExample], use: bool) -> list[list[float | None]]:
    """[[chosen, rejected] per pair]: the sampler's values, or all None when not ``use``d."""
    return [[t.chosen_ref, t.rejected_ref] if use else [None, None] for t in toks]


def stage_reference(toks: list[TokenizedExample], score: ScoreFn, tcfg, ids: list[str],
                    seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """(chosen, rejected) reference log-probs [N] (float32, CPU) of preference pairs, and the summary.

    Every process of a multi-process trainer must call it with the same arguments: ``score``
    may run collectives, and all take the same branches.
    """
    n = len(toks)
    if any(t.rejected is None for t in toks):
        raise ValueError("stage_reference: reference log-probs are for preference pairs; "
                         "an example has no rejected response")
    given = given_references(toks, tcfg.sampler_ref_logprobs)
    refs = torch.empty((2, n), dtype=torch.float32)
    whole = [i for i in range(n) if given[i] == [None, None]]
    if whole:  # as pairs: the prompt once per pair where the trainer's pass shares it
        chosen, rejected = score([toks[i] for i in whole])
        refs[0, whole], refs[1, whole] = chosen.float().cpu(), rejected.float().cpu()
    rows = [(i, side) for i in range(n) if given[i] != [None, None]
            for side in (0, 1) if given[i][side] is None]
    singles: dict[tuple, int] = {}  # (prompt, response) ids -> its row in the forward
    if rows:  # one response of a pair: a single-sequence row, each distinct one once
        # A gold CoT winner is in every pair of its prompt (irpo.pairs.wraparound_pairs).
        slot = [singles.setdefault((tuple(toks[i].prompt), tuple(toks[i].rejected if side else
                                                                toks[i].chosen)), len(singles))
                for i, side in rows]
        values, _ = score([TokenizedExample(list(p), list(r)) for p, r in singles])
        values = values.float().cpu()
        for (i, side), k in zip(rows, slot):
            refs[side, i] = values[k]
    known = [(i, side) for i in range(n) for side in (0, 1) if given[i][side] is not None]
    for i, side in known:
        refs[side, i] = given[i][side]
    info = {"ref_rows": 2 * n, "ref_rows_from_sampler": len(known),
            "ref_rows_computed": 2 * len(whole) + len(rows),
            "ref_forward_rows": 2 * len(whole) + len(singles)}  # sequences actually scored
    info.update(check_references(toks, given, score, tcfg, ids, seed))
    log.info("reference log-probs: %d of %d responses from the sampler, %d computed%s",
             len(known), 2 * n, info["ref_rows_computed"],
             "" if info["ref_logprob_check_max_abs_diff"] is None else
             f"; recomputed {info['ref_check_pairs']} pairs: max |sampler - forward| "
             f"{info['ref_logprob_check_max_abs_diff']:.2e}")
    return (refs[0], refs[1]), info


def check_references(toks: list[TokenizedExample], given: list[list[float | None]], score: ScoreFn,
                     tcfg, ids: list[str], seed: int) -> dict:
    """Score ``trainer.ref_check_pairs`` random pairs with a sampler reference again and compare.

    Returns ``{"ref_check_pairs": k, "ref_logprob_check_max_abs_diff": max |diff| or None}``;
    raises ReferenceMismatch above ``trainer.ref_check_tolerance``.
    """
    candidates = [i for i, g in enumerate(given) if g != [None, None]]
    k = min(tcfg.ref_check_pairs, len(candidates))
    if k <= 0:
        return {"ref_check_pairs": 0, "ref_logprob_check_max_abs_diff": None}
    picked = sorted(random.Random(f"{seed}:ref-check").sample(candidates, k))
    chosen, rejected = score([toks[i] for i in picked])  # as pairs, as for unknown pairs
    worst = (0.0, picked[0], 0)
    for j, i in enumerate(picked):
        for side, recomputed in enumerate((chosen[j], rejected[j])):
            if given[i][side] is not None:
                diff = abs(given[i][side] - float(recomputed))
                diff = math.inf if math.isnan(diff) else diff  # NaN: a mismatch
                worst = max(worst, (diff, i, side))
    diff, i, side = worst
    tolerance = tcfg.ref_check_tolerance
    if diff > tolerance:
        name = ("chosen", "rejected")[side]
        recomputed = float((chosen, rejected)[side][picked.index(i)])
        raise ReferenceMismatch(
            f"reference log-prob check: pair {i} (id={ids[i]!r}), {name} response: the sampler "
            f"gave {given[i][side]:.6f}, the trainer's forward gives {recomputed:.6f} "
            f"(|diff| {diff:.3g} > trainer.ref_check_tolerance={tolerance}). The sampler must "
            "score the same token ids with the model training starts from (same checkpoint; "
            "sampler.dtype as model.dtype). Set trainer.sampler_ref_logprobs=false to recompute "
            "them all, or raise trainer.ref_check_tolerance (bf16 sums differ by more).")
    return {"ref_check_pairs": k, "ref_logprob_check_max_abs_diff": diff}
