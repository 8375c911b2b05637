"""Labelled samples -> training examples, one data policy per method.

The "label" stage writes one record per training prompt::

    {"id": str, "prompt": str, "gold_cot": str | None,
     "samples": [{"text": str, "correct": bool}, ...]}

and the "pair" stage turns them into the examples the trainer reads::

    examples, stats = build_examples(records, method.data, cfg.pairs_per_prompt,
                                     add_gold_to_winners=cfg.dataset.add_gold_to_winners,
                                     max_examples=cfg.max_pairs, seed=cfg.seed)

``data`` is the method's data policy:

- ``"pairs"`` (dpo, rpo): K (winner, loser) pairs per prompt, winners = distinct
  correct samples (plus the gold CoT, first, when configured), losers = distinct
  incorrect samples, paired by :func:`wraparound_pairs` (the paper's walk down both lists,
  skipping a combination already taken) -> ``{id, prompt, chosen, rejected}``,
  plus ``chosen_ref_logprob`` and ``rejected_ref_logprob`` when the sampler returned
  log-probs for the prompt's samples (``sample.logprob``, sampler=vllm with
  return_logprobs): the sampled model M(t-1) is the reference of the training that
  follows, so the trainer need not recompute them (irpo.training.reference). The gold
  CoT's is the record's ``gold_logprob`` (scored by the sampler, irpo.driver). They are
  null where unknown: a sample the sampler could not vouch for, an unscored gold CoT;
- ``"correct"`` (STaR): up to K distinct correct samples -> ``{id, prompt, chosen}``;
  self-generated only, so ``add_gold_to_winners`` does not apply;
- ``"gold"`` (SFT): the gold CoT of every prompt -> ``{id, prompt, chosen}``.

Everything random is seeded from ``seed`` and the record id with string seeds
(hashed by ``random`` with SHA-512, not ``hash()``), so the output is the same
for the same inputs in any process, whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

DATA_POLICIES = ("pairs", "correct", "gold")
# The sampler's log-probs of a pair's responses: the reference log-probs, if the sampled
# model is the one training starts from (see the module docstring).
REF_KEYS = ("chosen_ref_logprob", "rejected_ref_logprob")


class NoTrainingData(RuntimeError):
    """build_examples produced zero examples; the message says why and what to change."""


def wraparound_pairs(winners: list[str], losers: list[str], k: int) -> list[tuple[str, str]]:
    """K (winner, loser) pairs walking both lists together, distinct while distinct ones remain.

    The paper's walk: pair i = (winners[i % W], losers[i % L]), restarting a list from its
    top when it runs out, so every winner and every loser is used before any is reused.
    Alone, that walk repeats after lcm(W, L) pairs (5 winners x 5 losers: 5 distinct pairs
    however large K is), though W x L combinations exist. So when the walk reaches a
    combination already taken, the loser index moves on by one, for this pair and every
    later one (pair i uses losers[(i + shift) % L]), until a free combination comes up. The
    first lcm(W, L) pairs are the paper's exactly; up to W x L pairs are then all distinct
    (winner i % W always has a free loser: winners take turns, so its row fills last); only
    when K exceeds W x L does the sequence repeat, from its start. [] if either list is empty.
    """
    if k < 0:
        raise ValueError(f"wraparound_pairs: k={k} must be >= 0")
    if not winners or not losers:
        return []
    n_w, n_l = len(winners), len(losers)
    distinct: list[tuple[int, int]] = []
    taken: set[tuple[int, int]] = set()
    shift = 0
    while len(distinct) < min(k, n_w * n_l):
        i = len(distinct)
        combination = (i % n_w, (i + shift) % n_l)
        if combination in taken:
            shift += 1  # skip it: the same winner with the next loser
            continue
        taken.add(combination)
        distinct.append(combination)
    return [(winners[w], losers[lo]) for w, lo in (distinct[i % len(distinct)] for i in range(k))]


@dataclass
class DataStats:
    """Counts of one build_examples call, for logging and for the NoTrainingData message.

    The skip counts are exclusive: a prompt with no candidates at all is counted in
    ``no_samples`` only, one with only winners in ``only_winners``, one with only
    losers in ``only_losers``. ``used_prompts`` counts prompts with at least one
    example left after the ``max_examples`` cap.
    """

    prompts: int = 0
    used_prompts: int = 0
    examples: int = 0
    only_winners: int = 0  # prompts skipped: winners but no losers
    only_losers: int = 0  # prompts skipped: losers but no winners
    no_samples: int = 0  # prompts skipped: no sample (and no gold winner) at all

    def as_dict(self) -> dict:
        return asdict(self)


def _distinct(texts: list[str]) -> list[str]:
    """Exact-duplicate removal that keeps first-seen order (set order would depend on hashing)."""
    return list(dict.fromkeys(texts))


def _candidates(record: dict, seed: int) -> tuple[list[str], list[str]]:
    """Distinct correct and incorrect sample texts of one record, each shuffled.

    The shuffle decouples which samples are used from the order the sampler
    returned them in; seeding by (seed, id) keeps a prompt's choice stable when
    other prompts are added or removed.
    """
    samples = record.get("samples") or []
    winners = _distinct([s["text"] for s in samples if s["correct"]])
    losers = _distinct([s["text"] for s in samples if not s["correct"]])
    rng = random.Random(f"{seed}:{record['id']}")
    rng.shuffle(winners)
    rng.shuffle(losers)
    return winners, losers


def _sampler_logprobs(record: dict) -> dict[str, float]:
    """Text -> the sampler's summed log-prob of it, from the first sample of that text with one.

    Samples of equal text are the same token ids under the same model, so any of them will do.
    """
    out: dict[str, float] = {}
    for s in record.get("samples") or []:
        if s.get("logprob") is not None:
            out.setdefault(s["text"], float(s["logprob"]))
    return out


def _gold(record: dict, why: str) -> str:
    gold = record.get("gold_cot")
    if not gold:
        raise ValueError(f"record {record.get('id')!r} has no gold_cot, which {why} needs")
    return gold


def _skip(stats: DataStats, has_winner: bool, has_loser: bool) -> None:
    if has_winner:
        stats.only_winners += 1
    elif has_loser:
        stats.only_losers += 1
    else:
        stats.no_samples += 1


def _examples_of(
    record: dict, data: str, k: int, add_gold: bool, seed: int, stats: DataStats
) -> list[dict]:
    """The examples of one record under one data policy (updates the skip counts)."""
    base = {"id": record["id"], "prompt": record["prompt"]}
    if data == "gold":
        return [{**base, "chosen": _gold(record, "data=gold (SFT)")}]
    winners, losers = _candidates(record, seed)
    if data == "correct":
        if not winners:
            _skip(stats, False, bool(losers))
            return []
        return [{**base, "chosen": w} for w in winners[:k]]
    gold = None
    if add_gold:
        # First, so that pair 0 always uses it: the gold CoT is the one winner
        # known to be right in its reasoning, not just in its final answer.
        gold = _gold(record, "add_gold_to_winners")
        winners = [gold] + [w for w in winners if w != gold]
    pairs = wraparound_pairs(winners, losers, k)
    if not pairs:
        _skip(stats, bool(winners), bool(losers))
    logps = _sampler_logprobs(record)
    if not logps:  # no sampler log-probs: the examples stay as they always were
        return [{**base, "chosen": w, "rejected": loser} for w, loser in pairs]
    if gold is not None and record.get("gold_logprob") is not None:
        logps[gold] = float(record["gold_logprob"])  # scored apart: it was not sampled
    return [{**base, "chosen": w, "rejected": loser,
             REF_KEYS[0]: logps.get(w), REF_KEYS[1]: logps.get(loser)}
            for w, loser in pairs]


def _cap(examples: list, max_examples: int, seed: int) -> list:
    """A seeded subsample of ``max_examples`` items, in their original order."""
    keep = random.Random(f"{seed}:cap").sample(range(len(examples)), max_examples)
    return [examples[i] for i in sorted(keep)]


def _no_data_message(data: str, stats: DataStats) -> str:
    if stats.prompts == 0:
        return f"no training examples for data={data}: there are no labelled prompts at all."
    counts = (
        f"{stats.prompts} prompts: {stats.only_winners} had only correct samples (no loser), "
        f"{stats.only_losers} had only incorrect samples (no winner), "
        f"{stats.no_samples} had no samples"
    )
    if data == "pairs":
        advice = (
            "sample more solutions per prompt (samples_per_prompt); raise the temperature if "
            "samples are mostly duplicates or all correct, lower it if they are all wrong; set "
            "dataset.add_gold_to_winners=true where the task has a gold CoT; or start from a "
            "stronger initial model"
        )
    else:
        advice = (
            "sample more solutions per prompt (samples_per_prompt), lower the temperature, "
            "or start from a stronger initial model"
        )
    return f"no training examples for data={data}: {counts}. To get some: {advice}."


def build_examples(
    records: list[dict],
    data: str,
    k: int,
    *,
    add_gold_to_winners: bool,
    max_examples: int | None,
    seed: int,
) -> tuple[list[dict], DataStats]:
    """Training examples of one iteration, in record order, and their counts.

    ``k`` is the number of pairs (data="pairs") or of correct samples
    (data="correct") per prompt; data="gold" ignores it. ``max_examples`` caps the
    total with a seeded subsample. Raises ValueError on bad arguments or a missing
    gold CoT, and NoTrainingData when no example results.
    """
    if data not in DATA_POLICIES:
        raise ValueError(f"build_examples: data={data!r} must be one of {DATA_POLICIES}")
    if k < 1:
        raise ValueError(f"build_examples: k={k} must be >= 1")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"build_examples: max_examples={max_examples} must be >= 1 or None")
    stats = DataStats(prompts=len(records))
    # (record index, example): used_prompts counts records, even if two share an id.
    indexed: list[tuple[int, dict]] = []
    for i, record in enumerate(records):
        found = _examples_of(record, data, k, add_gold_to_winners, seed, stats)
        indexed.extend((i, example) for example in found)
    if max_examples is not None and len(indexed) > max_examples:
        indexed = _cap(indexed, max_examples, seed)
    stats.examples = len(indexed)
    stats.used_prompts = len({i for i, _ in indexed})
    if not indexed:
        raise NoTrainingData(_no_data_message(data, stats))
    return [example for _, example in indexed], stats


def pool_examples(
    example_lists: list[list[dict]], data: str, *, max_examples: int | None, seed: int
) -> list[dict]:
    """Concatenate the training data of several iterations (the pooled-data ablation).

    ``data="pairs"`` keeps the pairs, less the sampler's log-probs (``REF_KEYS``): pooled
    training starts from one model, which sampled at most one of the iterations, so the
    trainer computes every reference log-prob itself; ``data="correct"`` keeps each
    distinct ``(id, chosen)`` once, as ``{id, prompt, chosen}`` (SFT on the winners).
    """
    if data not in ("pairs", "correct"):
        raise ValueError(f"data={data!r}: only pairs or correct can be pooled")
    pooled: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for examples in example_lists:
        for ex in examples:
            if data == "pairs":
                if "rejected" not in ex:
                    raise ValueError(f"pooled example {ex.get('id')} has no rejected response")
                pooled.append({k: v for k, v in ex.items() if k not in REF_KEYS})
            elif (ex["id"], ex["chosen"]) not in seen:
                seen.add((ex["id"], ex["chosen"]))
                pooled.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": ex["chosen"]})
    if max_examples is not None and len(pooled) > max_examples:
        pooled = _cap(pooled, max_examples, seed)
    return pooled
