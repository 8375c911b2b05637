"""MATH (Hendrycks et al., 2021) as an IRPO task: 4-shot ``\\boxed`` prompt, math-verify checking.

Built through the registry (``dataset=math``; ``dataset.name=math500`` evaluates on the
500-problem PRM800K test subset instead of the 5,000); inspect with ``python -m irpo.tasks math``.

* Prompt: an instruction asking for "Final answer: $\\boxed{...}$", then ``num_shots`` (<= 4)
  fixed training problems with short solutions (:data:`EXEMPLARS`, found in any copy of the data
  by a hash of their problem text, and excluded from train and valid), then the question.
* Gold answer: the last ``\\boxed{...}`` / ``\\fbox{...}`` of the solution (nested braces kept);
  a record without one (two train records end in an empty ``\\boxed{}``) is left out and
  listed in ``dropped``.
  Gold CoT: the solution, then "Final answer: $\\boxed{<gold>}$", the shape the prompt asks for.
* Model answer (:func:`extract`; text work in :mod:`irpo.tasks.answer_text`), from the response
  cut at a hallucinated next "Question:", first rule that applies:
  1. a "Final answer" sentence after the last box (or with no box): the answer in its first line,
     that line when it is all math, else its last math span or number ("The largest $n$ is 34."
     is 34; "12,000,023. I hope it is correct." is 12,000,023);
  2. the last ``\\boxed{...}``; when the gold lists several values (:func:`~irpo.tasks.answer_text.several_values`) and
     the response ends in several boxes joined only by connectors (``\\boxed{(2,2)} and
     \\boxed{(6,2)}``), those boxes together (:func:`extract_for`);
  3. with neither box nor "Final answer": the last math span or number of the closing sentence
     (the rule GSM8K and the peers use; ``I hope it is correct.`` and chat tokens dropped).
  Percent words become ``\\%`` (``28 percent`` is ``28\\%``). Answers over ``MAX_ANSWER_CHARS``
  are not answers.
* Equality: identical strings are equal at once; otherwise math-verify (``parse`` with LaTeX
  extraction only, never its ``ExprExtractionConfig``, which runs ``sympy.parse_expr``, an
  ``eval``; then ``verify``), and where math-verify cannot parse one side, the MATH repository's
  string normalisation (``is_equiv`` of ``math_equivalence.py``, re-implemented below).
  Every comparison runs in a killable worker process bounded to 1 s (:mod:`irpo.tasks.timeout`).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

from irpo.config import TASKS
from irpo.registry import Backend
from irpo.tasks.answer_text import box_spans, locate, several_values, tidy
from irpo.tasks.base import Example
from irpo.tasks.common import DataError, HubTask, HubTaskConfig, Source, load_records, render
from irpo.tasks.timeout import CheckError, CheckTimeout, lazy_pool

INSTRUCTION = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    'and when you\'re ready to answer, please use the format "Final answer: $\\boxed{...}$"\n\n'
)
PROMPT = INSTRUCTION + "{examples}Question: {question}\nSolution:"
SHOT = "Question: {problem}\nSolution: {solution}\nFinal answer: $\\boxed{{{answer}}}$\n\n"

# Four short training problems with four kinds of answer: integer, fraction, point, expression.
# (original path, sha256(problem)[:16]); the hash finds them in the hub copies, which lack paths.
EXEMPLARS = (
    ("train/algebra/930.json", "253a37fc37ba8992"),
    ("train/counting_and_probability/243.json", "40759ca11c10828d"),
    ("train/geometry/683.json", "6fedb4c7e304aec8"),
    ("train/precalculus/619.json", "1555d37407044605"),
)
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
            "number_theory", "prealgebra", "precalculus")
DEFAULT_HUB = "EleutherAI/hendrycks_math"
MATH = Source("math", {"train": "train.jsonl", "test": "test.jsonl"}, DEFAULT_HUB, SUBJECTS,
              ids={"train": "train_ids.txt", "test": "test_ids.txt"})
MATH500 = Source("math500", {"test": "test.jsonl"}, "HuggingFaceH4/MATH-500")
MAX_ANSWER_CHARS = 1000


def problem_hash(problem: str) -> str:
    return hashlib.sha256(problem.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------ extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE_RE = re.compile(r"\\boxed +([^\s$]+)")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``; linear time in ``text``."""
    if _BOX_RE.search(text) is None:
        m = None
        for m in _BOX_SPACE_RE.finditer(text):  # "\boxed 5", an old MATH spelling
            pass
        return m.group(1) if m else None
    spans = box_spans(text)  # in opening order: the last one opened that is complete
    return spans[-1][2] if spans else None


def _unwrap(answer: str) -> str:
    """Drop math delimiters and sentence punctuation around an answer."""
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left + right):
            answer = answer[len(left):len(answer) - len(right)].strip()
    return answer.rstrip(".").strip()


def _clean(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = tidy(_unwrap(answer))
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def extract(response: str) -> str | None:
    """The answer of a response (one box, sentence or expression; see the module docstring)."""
    return _clean(locate(response.split("\nQuestion:", 1)[0])[0])


def extract_for(response: str, gold: str) -> str | None:
    """The answer checked against ``gold``: as :func:`extract`, except that several boxes in a
    row (``\\boxed{(2,2)} and \\boxed{(6,2)}``) are read together when the gold lists several
    values. For a one-value gold the last box alone counts, as a model that boxes candidates
    ``\\boxed{3} or \\boxed{5}`` has not answered with a list."""
    answer, run = locate(response.split("\nQuestion:", 1)[0])
    if len(run) >= 2 and several_values(gold):
        parts = [_clean(part) for part in run]
        if all(parts):
            return _clean(", ".join(parts))
    return _clean(answer)


# ------------------------------------------------- equivalence (runs in the worker)


def _split_fix(s: str, marker: str, fix) -> str:
    parts = s.split(marker)
    return parts[0] + "".join(marker + fix(p) for p in parts[1:])


def _frac_fix(part: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}; too short: leave (as the original does)
    if part.startswith("{") or len(part) < 2:
        return part
    a, b, rest = part[0], part[1], part[2:]
    return "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)


def _sqrt_fix(part: str) -> str:
    return part if part.startswith("{") else "{" + part[0] + "}" + part[1:]  # IndexError -> raw


def hendrycks_normalise(s: str) -> str:
    """The MATH repository's ``_strip_string`` (Hendrycks et al., MIT), step for step."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"),
                     ("dfrac", "frac"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
                     ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # a unit on the right
        head, *tail = s.split("\\text{ ")
        if len(tail) != 1:
            raise ValueError("ambiguous units")
        s = head
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    if "\\sqrt" in s:
        s = _split_fix(s, "\\sqrt", _sqrt_fix)
    s = s.replace(" ", "")
    s = _split_fix(s, "\\frac", _frac_fix)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(\d{1,50})/(\d{1,50})", s)
    if m and s == f"{int(m.group(1))}/{int(m.group(2))}":
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def hendrycks_equiv(a: str, b: str) -> bool:
    try:
        return hendrycks_normalise(a) == hendrycks_normalise(b)
    except Exception:  # noqa: BLE001  # the original falls back to raw equality when normalising fails
        return a == b


def _parse(answer: str) -> list:
    from math_verify import LatexExtractionConfig, parse

    # Boxed so that math-verify takes the whole answer, not a fragment it finds inside.
    return parse("\\boxed{" + answer + "}",
                 extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                 parsing_timeout=None)  # bounded by the worker's timer instead (see timeout.py)


@lru_cache(maxsize=8192)
def _parse_gold(answer: str) -> list:
    return _parse(answer)  # each gold is checked against N samples: parse it once


def _parsed(objs: list) -> bool:
    return any(not isinstance(o, str) for o in objs)


def _kind(objs: list) -> str:
    """"implicit" for an equation in standard form ("11x + 6y + 86 = 0"), "relation" for any
    other (in)equality, "value" otherwise."""
    from sympy import Equality, Symbol
    from sympy.core.relational import Relational

    for o in objs:
        if isinstance(o, Equality) and o.rhs == 0 and not isinstance(o.lhs, Symbol):
            return "implicit"
        if isinstance(o, Relational):
            return "relation"
    return "value"


def answers_equal(pred: str, gold: str) -> bool:
    """math-verify equality of two extracted answers; string normalisation where it can't parse."""
    from math_verify import verify

    gold_objs, pred_objs = _parse_gold(gold), _parse(pred)
    if _parsed(gold_objs) and _parsed(pred_objs):
        # math-verify compares "lhs = rhs" with a value through rhs, which is right for "x = 5"
        # or "a + b = 5", but makes the plane "11x + 6y + 5z + 86 = 0" equal to the number 0.
        kinds = {_kind(gold_objs), _kind(pred_objs)}
        if "implicit" in kinds and "value" in kinds:
            return False
        return bool(verify(gold_objs, pred_objs, timeout_seconds=None))
    return hendrycks_equiv(pred, gold)


def warm_up() -> None:
    """Load math-verify's lazy parts and silence its timeout warnings (we bound time ourselves)."""
    import logging

    import math_verify.grader
    import math_verify.parser

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    answers_equal("\\frac{1}{2}", "0.5")


# The worker pool that runs answers_equal (irpo.tasks.timeout), started on first use.
check_pool = lazy_pool({"math_equal": answers_equal}, warm_up=warm_up)

_VERDICTS: dict[tuple[str, str], bool] = {}  # N samples of a prompt often share an answer
_MAX_VERDICTS = 200_000


def is_equal(pred: str, gold: str) -> bool:
    """Bounded equality in the caller's process (any thread); failures and timeouts are False."""
    if pred.strip() == gold.strip():
        return True
    key = (pred, gold)
    if key in _VERDICTS:
        return _VERDICTS[key]
    try:
        verdict = bool(check_pool().call("math_equal", pred, gold))
    except (CheckTimeout, CheckError):
        return False  # not remembered: a timeout may come from a busy machine
    if len(_VERDICTS) >= _MAX_VERDICTS:
        _VERDICTS.clear()
    _VERDICTS[key] = verdict
    return verdict


# ------------------------------------------------------------------------- task


class MathTask(HubTask):
    name = "math"
    max_shots = len(EXEMPLARS)
    default_template = PROMPT
    stop_sequences = ("\nQuestion:",)
    test_source = MATH

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._examples_block: str | None = None
        self.dropped: list[str] = []  # records without a usable gold answer, left out

    def _records(self, source: Source, split: str) -> list[dict]:
        hub = self.cfg.hub_name if source is MATH else None
        configs = None
        if source is MATH and (self.cfg.hub_config or (hub and hub != DEFAULT_HUB)):
            configs = (self.cfg.hub_config,)  # another mirror: one config (None: its default)
        return load_records(self.cfg, source, split, hub_name=hub, hub_configs=configs)

    def _shots(self, train: list[dict]) -> str:
        if self._examples_block is None:
            by_hash = {problem_hash(r["problem"]): r for r in train}
            shots = []
            for path, digest in EXEMPLARS[: self.cfg.num_shots or 0]:
                rec = by_hash.get(digest)
                if rec is None:
                    raise DataError(f"MATH few-shot exemplar {path} is not in this training data "
                                    f"(dataset.num_shots={self.cfg.num_shots})")
                shots.append(SHOT.format(problem=rec["problem"].strip(),
                                         solution=rec["solution"].strip(),
                                         answer=last_boxed(rec["solution"])))
            self._examples_block = "".join(shots)
        return self._examples_block

    def _pool(self, split: str) -> list[Example]:
        need_train = split == "train" or (self.cfg.num_shots or 0) > 0
        train = self._records(MATH, "train") if need_train else []
        block = self._shots(train)
        records = train if split == "train" else self._records(self.test_source, "test")
        exclude = {digest for _, digest in EXEMPLARS} if split == "train" else set()
        examples = []
        for i, rec in enumerate(records):
            if problem_hash(rec["problem"]) in exclude:
                continue
            boxed = last_boxed(rec["solution"])
            gold = None if boxed is None else _unwrap(boxed)  # as extract() would read it
            if not gold:  # e.g. train/number_theory/1038.json ends in an empty "\boxed{}"
                self.dropped.append(str(rec.get("unique_id") or f"{self.name}/{split}/{i}"))
                continue
            examples.append(Example(
                id=str(rec.get("unique_id") or f"{self.name}/{split}/{i}"),
                question=rec["problem"].strip(),
                prompt=render(self.template, question=rec["problem"].strip(), examples=block),
                gold_answer=gold,
                gold_cot=f"{rec['solution'].strip()}\nFinal answer: $\\boxed{{{gold}}}$",
            ))
        return examples

    def extract_answer(self, response: str) -> str | None:
        try:
            return extract(response)
        except Exception:  # noqa: BLE001  # untrusted text: never let a checker bug stop the loop
            return None

    def is_correct(self, response: str, gold_answer: str) -> bool:
        try:
            pred = extract_for(response, gold_answer)
        except Exception:  # noqa: BLE001  # untrusted text: never let a checker bug stop the loop
            return False
        return pred is not None and is_equal(pred, gold_answer)

    def vote_key(self, answer: str) -> str:
        """maj@k's cheap canonical form (irpo.evaluate.majority): the MATH repository's
        normalisation, under which ``\\dfrac12``, ``0.5`` and ``1/2`` are ``\\frac{1}{2}``."""
        try:
            return hendrycks_normalise(answer)
        except Exception:  # noqa: BLE001  # untrusted text: the answer as written
            return answer

    def same_answer(self, a: str, b: str) -> bool:
        """maj@k's costly equality of two answers of different keys (bounded, never raises)."""
        return is_equal(a, b)


    def problem_meta(self) -> dict[str, dict]:
        """Test problem id (as in the predictions) -> its level (1-5; None where not stated) and
        subject (``algebra``, ``counting_and_probability``, ...), for the report's breakdown."""
        out = {}
        for i, rec in enumerate(self._records(self.test_source, "test")):
            rid = str(rec.get("unique_id") or f"{self.name}/test/{i}")
            level = re.search(r"\d+", str(rec.get("level", "")))
            subject = rec.get("type") or rec.get("subject") or rid.split("/")[-2:][0]
            out[rid] = {"level": int(level.group()) if level else None,
                        "subject": subject.lower().replace("&", "and").replace(" ", "_")}
        return out


class Math500Task(MathTask):
    """MATH train prompts; the PRM800K 500-problem test subset as ``test``."""

    name = "math500"
    test_source = MATH500


def build(cfg: Any) -> MathTask:
    return MathTask(cfg)


def build_500(cfg: Any) -> Math500Task:
    return Math500Task(cfg)


# dataset=math: a hub task (schema/dataset/hub), built by build above.
TASKS.register("math", Backend(HubTaskConfig, "irpo.tasks.math:build", schema_name="hub"))

# dataset=math500: a hub task (schema/dataset/hub), built by build_500 above.
TASKS.register("math500", Backend(HubTaskConfig, "irpo.tasks.math:build_500", schema_name="hub"))
