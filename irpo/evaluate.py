"""Evaluation: greedy accuracy and maj@k on a split.

Greedy decoding gives one answer per problem. maj@k samples k responses at
``eval.maj_temperature``, groups their extracted answers into votes and checks the
first response of the largest group (ties go to the group whose first response came
first, so the result is deterministic). Identical answers are one vote. A task whose
answers can be equal but written differently defines ``vote_key(answer)``, a cheap
canonical form (MATH: the MATH repository's normalisation, under which ``\\frac{1}{2}``,
``0.5`` and ``\\dfrac12`` are one vote), and may define ``same_answer(a, b)``, a costly
equality (MATH: math-verify in a worker process, ~3-60 ms a call): groups of different
keys are then merged by it, the largest groups first, with at most k calls per problem so
that a vote costs about what its k extractions do (measured: 28 unbounded calls over 8
distinct answers took 1.7 s on a loaded machine). The other tasks' extracted answers are
canonical already (GSM8K's reduced numbers, arith's integers, ARC's letters).
"""

from __future__ import annotations

from pathlib import Path

from irpo.chunks import discard_chunks, run_chunks
from irpo.rundir import write_jsonl
from irpo.tasks import Example, Task


def majority(answers: list[str | None], key=None, same=None, max_checks: int = 0) -> int | None:
    """Index of the first response of the largest group of equal answers (None: no answers).

    ``key(a)``: a canonical form; answers with equal keys are one group (None: the string).
    ``same(a, b)``: whether the first answers of two groups are equal, called at most
    ``max_checks`` times, each group (largest first) against the larger ones kept so far.
    A tie goes to the group whose first response came first.
    """
    groups: dict[str, list[int]] = {}  # insertion order = order of first responses
    for i, a in enumerate(answers):
        if a is not None:
            groups.setdefault(key(a) if key is not None else a, []).append(i)
    merged: list[list[int]] = []
    checks = 0
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        into = None
        for kept in merged:
            if same is None or checks >= max_checks:
                break
            checks += 1
            if same(answers[kept[0]], answers[members[0]]):
                into = kept
                break
        if into is None:
            merged.append(members)
        else:
            into.extend(members)
            into.sort()
    if not merged:
        return None
    return min(merged, key=lambda m: (-len(m), m[0]))[0]


def evaluate(task: Task, sampler, examples: list[Example], *, max_new_tokens: int,
             maj_k: int, maj_temperature: float, seed: int, prefix: str,
             out_file: Path | None = None, chunks: tuple[Path, int, str] | None = None
             ) -> dict[str, float]:
    """Greedy accuracy (and maj@k) of ``sampler`` on ``examples``; records to ``out_file``.

    ``chunks``: (stage folder, prompts per chunk, stage label): work in committed chunks that
    a rerun reuses (irpo.chunks); the records and metrics are those of one whole pass.
    """
    def one_chunk(first: int, part: list[Example]) -> list[dict]:
        return _evaluate_chunk(task, sampler, part, first, max_new_tokens, maj_k,
                               maj_temperature, seed, prefix)

    if chunks is None:
        records = one_chunk(0, examples)
    else:
        folder, size, label = chunks
        records = run_chunks(folder, examples, size, one_chunk, label)
        discard_chunks(folder)
    n = len(examples)
    metrics = {f"{prefix}/accuracy": sum(r["correct"] for r in records) / n,
               f"{prefix}/response_tokens": sum(r.pop("_tokens") for r in records) / n}
    if maj_k > 0:
        metrics[f"{prefix}/maj_at_k"] = sum(r["maj_correct"] for r in records) / n  # k is eval.maj_k
    if out_file is not None:
        write_jsonl(out_file, records)
    return metrics


def _evaluate_chunk(task: Task, sampler, examples: list[Example], first: int, max_new_tokens: int,
                    maj_k: int, maj_temperature: float, seed: int, prefix: str) -> list[dict]:
    """Prediction records of ``examples`` (prompts ``first``, ``first + 1``, ... of the split)."""
    prompts = [e.prompt for e in examples]
    span = f"{first}-{first + len(prompts)}"
    greedy = sampler.generate(prompts, 1, 0.0, max_new_tokens, seed, desc=f"{prefix} greedy {span}",
                              first_index=first)
    records = [{"id": ex.id, "gold": ex.gold_answer, "greedy": g.text,
                "correct": task.is_correct(g.text, ex.gold_answer), "_tokens": g.num_tokens}
               for ex, (g,) in zip(examples, greedy)]
    if maj_k > 0:
        samples = sampler.generate(prompts, maj_k, maj_temperature, max_new_tokens, seed + 1,
                                   desc=f"{prefix} maj@{maj_k} {span}", first_index=first)
        for ex, gens, rec in zip(examples, samples, records):
            answers = [task.extract_answer(g.text) for g in gens]
            i = majority(answers, getattr(task, "vote_key", None),
                         getattr(task, "same_answer", None), max_checks=maj_k)
            ok = i is not None and task.is_correct(gens[i].text, ex.gold_answer)
            tokens = rec.pop("_tokens")  # keeps the record's key order: predictions.jsonl as before
            rec.update(majority_answer=answers[i] if i is not None else None, maj_correct=ok,
                       _tokens=tokens)
    return records
