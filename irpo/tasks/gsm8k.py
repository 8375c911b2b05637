"""GSM8K (Cobbe et al., 2021) as an IRPO task: loader, the paper's zero-shot prompt, numeric checking.

Built through the registry (``dataset=gsm8k``); inspect with ``python -m irpo.tasks gsm8k``.

* Gold answer: the number after ``####`` (thousands separators removed).
* Gold CoT (added to the winners in the paper): the reference solution without its ``<<a*b=c>>``
  calculator annotations, ending in ``Final answer: N``.
* Model answer: the first number on the first line that has one after the LAST "Final answer";
  on that line, the part after the last ``=`` wins ("Final answer: 5 + 3 = 8" is 8). Without any
  "Final answer", the last number in the text.
* Equality is exact on rationals (``fractions.Fraction`` built from the digits, never ``float`` or
  ``eval``): ``$1,080.00`` = ``1080``, ``\\frac{1}{2}`` = ``0.5`` = ``1/2``. Currency signs, units
  and words around the number are ignored; ``50%`` is the number 50 (GSM8K asks "what percent"
  questions with the percentage as the answer); a decimal may lack its integer part
  (``Final answer: .5``). Number tokens longer than 64 characters are not
  numbers (no 100,000-digit integer conversions on untrusted text).
"""

from __future__ import annotations

import re
from fractions import Fraction
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
    'and when you\'re ready to answer, please use the format "Final answer: ..."\n'
    "Question: {question}\n"
    "Solution:"
)

SOURCE = Source(
    folder="gsm8k",
    files={"train": "train.jsonl", "test": "test.jsonl"},
    hub_name="openai/gsm8k",
    hub_configs=("main",),
)

MAX_NUMBER_CHARS = 64
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)"
_NUMBER_RE = re.compile(
    r"\\[dt]?frac\{\s*(?P<fneg>[-−]?)\s*(?P<fnum>\d+)\s*\}\{\s*(?P<fden>\d+)\s*\}"
    # "(?=\.\d)": a decimal with no integer part (".5") has an empty integer part
    rf"|(?<![\w.])(?P<neg>[-−]?)(?P<int>{_INT}|(?=\.\d))"
    rf"(?:(?P<dec>\.\d+)|(?<=\d)\s*/\s*(?P<den>\d+)(?![\d.]))?"
)


def _value(m: re.Match) -> Fraction | None:
    """The exact value of one number match, or None if it is too long to be an answer."""
    if len(m.group(0)) > MAX_NUMBER_CHARS:
        return None
    if m.group("fnum") is not None:
        num, den, neg = int(m.group("fnum")), int(m.group("fden")), m.group("fneg")
    else:
        digits = m.group("int").replace(",", "") or "0"  # ".5" is 0.5
        if m.group("dec"):
            num, den = int(digits + m.group("dec")[1:]), 10 ** (len(m.group("dec")) - 1)
        else:
            num, den = int(digits), int(m.group("den") or 1)
        neg = m.group("neg")
    if den == 0:
        return None
    return Fraction(-num if neg else num, den)


def canonical(value: Fraction) -> str:
    """``18``, ``2.5``, ``1/3``: one spelling per value, so majority votes group equal answers."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**places}.{scaled % 10**places:0{places}d}"


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact rational (None if there is none)."""
    m = _NUMBER_RE.search(text)
    return _value(m) if m else None


def _final_answer_number(segment: str) -> Fraction | None:
    for line in segment[:500].splitlines()[:5]:
        if not _NUMBER_RE.search(line):
            continue
        # "5 + 3 = 8": the result after the last "=" (if a number follows it)
        tail = line.rsplit("=", 1)[-1]
        return parse_number(tail if _NUMBER_RE.search(tail) else line)
    return None


def extract_number(response: str) -> Fraction | None:
    segment = after_last_final_answer(response)
    if segment is not None:
        return _final_answer_number(segment)
    last = None
    for last in _NUMBER_RE.finditer(response):
        pass
    return _value(last) if last else None


def gold_from_solution(solution: str) -> str:
    """The canonical number after ``####`` in a GSM8K reference solution."""
    if "####" not in solution:
        raise ValueError(f"no '#### <number>' line in GSM8K solution: {solution[-80:]!r}")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"no number after #### in GSM8K solution: {solution[-80:]!r}")
    return canonical(value)


def gold_cot(solution: str) -> str:
    """The reference solution as a model response: no calculator notes, ends in the answer line."""
    body, _ = solution.rsplit("####", 1)
    body = re.sub(r"<<[^<>]*>>", "", body).rstrip()
    return f"{body}\nFinal answer: {gold_from_solution(solution)}"


class GSM8K(HubTask):
    name = "gsm8k"
    default_template = PROMPT
    stop_sequences = ("\nQuestion:",)

    def _pool(self, split: str) -> list[Example]:
        records = load_records(self.cfg, SOURCE, split, hub_name=self.cfg.hub_name,
                               hub_configs=(self.cfg.hub_config or "main",))
        examples = []
        for i, rec in enumerate(records):
            with reading(rec):
                question, solution = rec["question"].strip(), rec["answer"]
                examples.append(Example(
                    id=f"gsm8k/{split}/{i}",
                    question=question,
                    prompt=render(self.template, question=question),
                    gold_answer=gold_from_solution(solution),
                    gold_cot=gold_cot(solution),
                ))
        return examples

    def extract_answer(self, response: str) -> str | None:
        try:
            value = extract_number(response)
        except Exception:  # noqa: BLE001  # untrusted text: a checker bug must not stop the loop
            return None
        return None if value is None else canonical(value)

    def is_correct(self, response: str, gold_answer: str) -> bool:
        try:
            value, gold = extract_number(response), parse_number(gold_answer)
        except Exception:  # noqa: BLE001
            return False
        return value is not None and gold is not None and value == gold


def build(cfg: Any) -> GSM8K:
    return GSM8K(cfg)


# dataset=gsm8k: a hub task (schema/dataset/hub), built by build above.
TASKS.register("gsm8k", Backend(HubTaskConfig, "irpo.tasks.gsm8k:build", schema_name="hub"))
