"""Evaluation: greedy accuracy and maj@k on a split.

Greedy decoding gives one answer per problem. maj@k samples k responses at
``eval.maj_temperature``, takes the most common extracted answer (ties go to
the answer seen first, so the result is deterministic) and checks the response
it came from. Answers written differently but equal (``0.5`` and ``1/2``)
count as different votes; for integer tasks this never matters.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from irpo.rundir import write_jsonl
from irpo.tasks import Example, Task


def majority(answers: list[str | None]) -> int | None:
    """Index of the first response whose answer is the most common one (None: no answers)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


def evaluate(task: Task, sampler, examples: list[Example], *, max_new_tokens: int,
             maj_k: int, maj_temperature: float, seed: int, prefix: str,
             out_file: Path | None = None) -> dict[str, float]:
    prompts = [e.prompt for e in examples]
    greedy = sampler.generate(prompts, 1, 0.0, max_new_tokens, seed, desc=f"{prefix} greedy")
    records = []
    correct = 0
    for ex, (g,) in zip(examples, greedy):
        ok = task.is_correct(g.text, ex.gold_answer)
        correct += ok
        records.append({"id": ex.id, "gold": ex.gold_answer, "greedy": g.text, "correct": ok})
    metrics = {f"{prefix}/accuracy": correct / len(examples),
               f"{prefix}/response_tokens": sum(g[0].num_tokens for g in greedy) / len(examples)}
    if maj_k > 0:
        samples = sampler.generate(prompts, maj_k, maj_temperature, max_new_tokens, seed + 1,
                                   desc=f"{prefix} maj@{maj_k}")
        maj_correct = 0
        for ex, gens, rec in zip(examples, samples, records):
            answers = [task.extract_answer(g.text) for g in gens]
            i = majority(answers)
            ok = i is not None and task.is_correct(gens[i].text, ex.gold_answer)
            maj_correct += ok
            rec.update(majority_answer=answers[i] if i is not None else None, maj_correct=ok)
        metrics[f"{prefix}/maj_at_k"] = maj_correct / len(examples)  # k is eval.maj_k
    if out_file is not None:
        write_jsonl(out_file, records)
    return metrics
