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

from irpo.chunks import discard_chunks, run_chunks
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
            i = majority(answers)
            ok = i is not None and task.is_correct(gens[i].text, ex.gold_answer)
            tokens = rec.pop("_tokens")  # keeps the record's key order: predictions.jsonl as before
            rec.update(majority_answer=answers[i] if i is not None else None, maj_correct=ok,
                       _tokens=tokens)
    return records
