"""ARC-Challenge (Clark et al., 2018) as an IRPO task, set up as in the paper.

Built through the registry (``dataset=arc_challenge``); inspect with
``python -m irpo.tasks arc_challenge``.

* Training prompts: ARC-Easy train + ARC-Challenge train (3,370); test: ARC-Challenge test (1,172).
* Options are shown as (A), (B), ... whatever the file's labels: the few questions labelled 1-4
  are shown as A-D, and the gold answer is stored as the letter shown. 3- and 5-choice questions
  keep their counts.
* Gold CoT: None. ARC has no reference reasoning, and a bare "Final answer: (C)" as a winner would
  teach the model to skip its reasoning.
* Model answer (a letter), first rule that matches wins: the text after the last "Final answer"
  ("Final answer: (C)", "Final Answer: **C**", "final answer is C."); else the last
  "answer is C" / "Answer: (C)"; else a trailing "(C)" or "C." at the very end. A capital letter
  followed by a word ("A bacterial population ...") is prose, not an option letter.
"""

from __future__ import annotations

import re
from typing import Any

from irpo.config import TASKS
from irpo.registry import Backend
from irpo.tasks.base import Example
from irpo.tasks.common import (
    HubTask,
    HubTaskConfig,
    Source,
    after_last_final_answer,
    load_records,
    reading,
    render,
)

PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    'and when you\'re ready to answer, please use the format "Final answer: (X)", where X is the '
    "letter of the correct option.\n"
    "Question: {question}\n"
    "Solution:"
)

_HUB = "allenai/ai2_arc"
_HUB_SPLITS = {"train": "train", "test": "test"}
EASY = Source("arc_easy", {"train": "ARC-Easy-Train.jsonl"}, _HUB, ("ARC-Easy",), _HUB_SPLITS)
CHALLENGE = Source(
    "arc_challenge",
    {"train": "ARC-Challenge-Train.jsonl", "test": "ARC-Challenge-Test.jsonl"},
    _HUB, ("ARC-Challenge",), _HUB_SPLITS,
)
LETTERS = "ABCDEFGH"

# An option letter: optionally in (), [] or ** **, followed by punctuation, a line end, or a
# parenthesis/dash (so "(C) Earth's rotation" and "C - the Sun" count, "A bacterial ..." does not).
_LETTER = r"[(\[]?\**([A-H])\**[)\]]?(?=[.,;:!)\]*]|\s*(?:$|\n|[(\-–—]))"
_LEAD_RE = re.compile(r"\s*(?:(?i:option|choice)\s+)?" + _LETTER)
_ANSWER_IS_RE = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*(?:(?i:option|choice)\s+)?" + _LETTER)
_TRAILING_RE = re.compile(r"(?:^|[\s:*])\(([A-H])\)[\s.*]*$|(?:^|\s)([A-H])\s*\.?\s*$")


def _normalise(rec: dict) -> tuple[str, list[tuple[str, str]], str]:
    """(stem, [(label, text)], answerKey) from an original-file row or a hub row."""
    q = rec["question"]
    if isinstance(q, dict):  # original ARC-V1 JSONL
        stem, choices = q["stem"], [(c["label"], c["text"]) for c in q["choices"]]
    else:  # allenai/ai2_arc rows
        stem, choices = q, list(zip(rec["choices"]["label"], rec["choices"]["text"]))
    return stem.strip(), choices, str(rec["answerKey"]).strip()


def to_example(rec: dict, template: str) -> Example:
    stem, choices, key = _normalise(rec)
    labels = [label for label, _ in choices]
    if key not in labels or len(choices) > len(LETTERS):
        raise ValueError(f"ARC record {rec.get('id')}: answerKey {key!r} not among labels {labels}")
    options = "\n".join(f"({LETTERS[i]}) {text.strip()}" for i, (_, text) in enumerate(choices))
    question = f"{stem}\n{options}"
    letter = LETTERS[labels.index(key)]
    return Example(
        id=str(rec["id"]),
        question=question,
        prompt=render(template, question=question, stem=stem, choices=options),
        gold_answer=letter,
        # ARC has no gold reasoning: the gold response is the answer line alone. The paper
        # does not add it to the winners (add_gold_to_winners is false for ARC); it is here
        # for method=sft and for runs that opt in.
        gold_cot=f"Final answer: ({letter})",
    )


def extract_letter(response: str) -> str | None:
    segment = after_last_final_answer(response)
    if segment is not None:
        m = _LEAD_RE.match(segment[:200])
        if m:
            return m.group(1)
    last = None
    for last in _ANSWER_IS_RE.finditer(response):
        pass
    if last:
        return last.group(1)
    m = _TRAILING_RE.search(response[-40:])
    if m:
        return m.group(1) or m.group(2)
    return None


class ARCChallenge(HubTask):
    name = "arc_challenge"
    default_template = PROMPT
    question_fields = ("question", "stem")  # {question} = {stem} + newline + {choices}
    stop_sequences = ("\nQuestion:",)

    def _pool(self, split: str) -> list[Example]:
        sources = (EASY, CHALLENGE) if split == "train" else (CHALLENGE,)
        examples = []
        for source in sources:
            for rec in load_records(self.cfg, source, split, hub_name=self.cfg.hub_name):
                with reading(rec):
                    examples.append(to_example(rec, self.template))
        return examples

    def extract_answer(self, response: str) -> str | None:
        try:
            return extract_letter(response)
        except Exception:  # noqa: BLE001  # untrusted text: never let a checker bug stop the loop
            return None

    def is_correct(self, response: str, gold_answer: str) -> bool:
        letter = self.extract_answer(response)
        return letter is not None and letter == gold_answer.strip().strip("()").upper()


def build(cfg: Any) -> ARCChallenge:
    return ARCChallenge(cfg)


# dataset=arc_challenge: a hub task (schema/dataset/hub), built by build above.
TASKS.register("arc_challenge", Backend(HubTaskConfig, "irpo.tasks.arc:build", schema_name="hub"))
