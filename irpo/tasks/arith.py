"""The embedded default task: synthetic multi-step arithmetic word problems.

Each problem is a short templated story ("Mia has 12 apples. She buys 7 more.
Then she gives away 5. Then she doubles them. How many apples does Mia have
now?") with 2-5 integer operations, and a gold chain of thought with one line
per operation, ending in the paper's answer format::

     12 + 7 = 19. 19 - 5 = 14. 14 * 2 = 28. Final answer: 28

It needs no download, so the whole IRPO loop runs offline on a CPU: the
built-in model (irpo/builtin_model.py) is pre-trained on the ``pretrain``
split, then improved on ``train`` and measured on ``test``.

Usage::

    from irpo.tasks.arith import ArithConfig, build_arith
    task = build_arith(ArithConfig(train_size=256, valid_size=100, test_size=300))
    task.load_split("test")[0].prompt   # 'Question: ...\\nAnswer:'

or, through the registry, ``irpo.tasks.build_task(cfg.dataset)``.

Splits are deterministic in ``data_seed`` and disjoint: every generated
question is put into a "pretrain" or an "eval" pool by a hash of its text, so
the pre-training split does not change when train/valid/test sizes change
(the built-in model need not be rebuilt), and the test split is the prefix of
the eval pool so it does not change with the train or valid sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from irpo.config import TASKS, DatasetConfig
from irpo.tasks.base import SPLITS, Example


@TASKS.backend("arith", builder="irpo.tasks.arith:build_arith")
@dataclass
class ArithConfig(DatasetConfig):
    """``dataset=arith``: the schema of this task, declared with its builder.

    These defaults are ``dataset=arith`` (conf/dataset/arith.yaml changes none of them), and
    M0 for every other task is pre-trained on ``ArithConfig()``'s pretrain split: one source.
    The sizes and difficulty are tuned so that the tiny model pre-trains in minutes on two
    CPU cores and leaves clear headroom; the pretrain split depends only on data_seed,
    pretrain_size and the difficulty fields, so other sizes reuse the cached M0.
    """

    name: str = "arith"
    data_seed: int = 1234
    pretrain_size: int = 20000
    train_size: int | None = 1024
    valid_size: int | None = 128
    test_size: int | None = 1000  # s.e. of an accuracy near 50%: 1.6 points
    min_ops: int = 2
    max_ops: int = 5
    max_operand: int = 9  # operands 1..max_operand; factors and divisors 2..5
    max_value: int = 99  # every intermediate result stays in [0, max_value]
    add_gold_to_winners: bool = True  # as the paper does on GSM8K (conf/dataset/arith.yaml)
    max_new_tokens: int = 96  # the longest gold CoT is ~70 tokens
    samples_per_prompt: int = 4
    pairs_per_prompt: int = 2
    temperature: list[float] = field(default_factory=lambda: [1.0])
    maj_k: int = 4  # maj@4: evaluation stays cheaper than sampling
    # A stronger NLL term than the paper's alpha=1 (conf/dataset/arith.yaml says why).
    alpha: float = 16.0


PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

# (name, pronoun). A few of each keeps the prompts varied without making the
# task about language: the difficulty is meant to be in the arithmetic.
_PEOPLE = (
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"),
    ("Ben", "he"), ("Lily", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
)
_OBJECTS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "shells")

# Sentence templates per operation; {p} is the pronoun, {n} the operand.
_ADD = ("{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more from a friend.",
        "{p} picks up {n} more.")
_SUB = ("{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}.", "{p} uses {n}.")
_MUL = ("{p} ends up with {n} times as many.", "{p} multiplies them by {n}.")
_DIV = ("{p} splits them into {n} equal groups and keeps one group.",
        "{p} shares them equally among {n} friends, keeping one share.")
_DOUBLE, _TRIPLE, _HALVE = "{p} doubles them.", "{p} triples them.", "{p} halves them."

# Factors and divisors stay small whatever max_operand is: a tiny model can
# learn "47 * 3" but not "47 * 13", and we want mistakes it can self-correct.
_MAX_FACTOR = 5

# One question in this many goes to the eval pool (train/valid/test); the rest
# to pre-training. Sized so that ~20k pre-training examples come with ~3k eval.
_EVAL_EVERY = 8


@dataclass(frozen=True)
class _Problem:
    question: str
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, result)

    @property
    def answer(self) -> int:
        return self.steps[-1][3]

    def cot(self) -> str:
        lines = [f" {a} {op} {b} = {r}." for a, op, b, r in self.steps]
        return "".join(lines) + f" Final answer: {self.answer}"


def _choose_step(rng: random.Random, x: int, cfg: ArithConfig) -> tuple[str, int, int]:
    """A random valid operation on ``x``: (op, operand, result), result in [2, max_value]."""
    options: list[tuple[str, list[int]]] = []
    adds = [n for n in range(1, cfg.max_operand + 1) if x + n <= cfg.max_value]
    # Results stay >= 2 (a chain at 0 stays there under "*"), and a subtraction
    # removes at most half: otherwise values drift down to a few small numbers
    # and guessing "2" scores well.
    subs = list(range(1, min(x // 2, x - 2, cfg.max_operand) + 1))
    top = min(_MAX_FACTOR, cfg.max_operand)
    muls = [f for f in range(2, top + 1) if x * f <= cfg.max_value]
    divs = [d for d in range(2, top + 1) if x % d == 0 and x // d >= 2]  # exact division only
    for op, operands in (("+", adds), ("-", subs), ("*", muls), ("/", divs)):
        if operands:
            options.append((op, operands))
    if not options:  # only possible for degenerate configs; checked in ArithTask
        raise ValueError(f"no valid arithmetic step from {x} under {cfg}")
    op, operands = rng.choice(options)
    n = rng.choice(operands)
    result = {"+": x + n, "-": x - n, "*": x * n, "/": x // n if n else 0}[op]
    return op, n, result


def _sentence(rng: random.Random, op: str, n: int, pronoun: str) -> str:
    if op == "*" and n in (2, 3) and rng.random() < 0.5:
        template = _DOUBLE if n == 2 else _TRIPLE
    elif op == "/" and n == 2 and rng.random() < 0.5:
        template = _HALVE
    else:
        template = rng.choice({"+": _ADD, "-": _SUB, "*": _MUL, "/": _DIV}[op])
    return template.format(p=pronoun, n=n)


def _make_problem(rng: random.Random, cfg: ArithConfig) -> _Problem:
    name, pronoun = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    x = rng.randint(2, cfg.max_operand)
    sentences = [f"{name} has {x} {obj}."]
    steps = []
    for i in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        op, n, result = _choose_step(rng, x, cfg)
        text = _sentence(rng, op, n, pronoun)
        # "She buys 7 more." then "Then she gives away 5." ...
        sentences.append(text[0].upper() + text[1:] if i == 0 else "Then " + text)
        steps.append((x, op, n, result))
        x = result
    sentences.append(f"How many {obj} does {name} have now?")
    return _Problem(" ".join(sentences), tuple(steps))


def _is_eval(question: str, seed: int) -> bool:
    # A stable hash (not Python's salted hash()) so pools are the same in every process.
    digest = hashlib.blake2b(f"{seed}:{question}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _EVAL_EVERY == 0


def generate_pools(cfg: ArithConfig, n_pretrain: int, n_eval: int) -> tuple[list[_Problem], list[_Problem]]:
    """Deduplicated problems: ``n_pretrain`` for pre-training and ``n_eval`` for the rest."""
    rng = random.Random(cfg.data_seed)
    seen: set[str] = set()
    pretrain: list[_Problem] = []
    evals: list[_Problem] = []
    # Give up rather than loop forever when the config allows too few distinct questions.
    max_attempts = 20 * (n_pretrain + _EVAL_EVERY * n_eval) + 1000
    for _ in range(max_attempts):
        if len(pretrain) >= n_pretrain and len(evals) >= n_eval:
            return pretrain, evals
        problem = _make_problem(rng, cfg)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        pool = evals if _is_eval(problem.question, cfg.data_seed) else pretrain
        pool.append(problem)
    raise ValueError(
        f"dataset: could not generate {n_pretrain} pre-training and {n_eval} eval distinct "
        f"questions with min_ops={cfg.min_ops}, max_ops={cfg.max_ops}, "
        f"max_operand={cfg.max_operand}; lower the sizes or widen the ranges"
    )


class ArithTask:
    """The :class:`irpo.tasks.base.Task` for synthetic arithmetic; see the module docstring."""

    name = "arith"

    def __init__(self, cfg: ArithConfig):
        self.cfg = cfg
        self.template = cfg.prompt_template or PROMPT_TEMPLATE
        self._check(cfg)
        self._splits: dict[str, list[Example]] | None = None

    @staticmethod
    def _check(cfg: ArithConfig) -> None:
        for key in ("pretrain_size", "train_size", "valid_size", "test_size"):
            value = getattr(cfg, key)
            if value is None or value < 0:
                raise ValueError(
                    f"dataset.{key}={value!r}: the arith task generates its data, "
                    "so every split needs an explicit size >= 0"
                )
        if not 1 <= cfg.min_ops <= cfg.max_ops:
            raise ValueError(f"dataset: need 1 <= min_ops <= max_ops, got {cfg.min_ops}, {cfg.max_ops}")
        if cfg.max_operand < 2 or cfg.max_value < 2 * cfg.max_operand:
            raise ValueError(
                f"dataset: need max_operand >= 2 and max_value >= 2 * max_operand, "
                f"got max_operand={cfg.max_operand}, max_value={cfg.max_value}"
            )
        if "{question}" not in (cfg.prompt_template or PROMPT_TEMPLATE):
            raise ValueError("dataset.prompt_template must contain '{question}'")

    def _build(self) -> dict[str, list[Example]]:
        cfg = self.cfg
        sizes = {"test": cfg.test_size, "valid": cfg.valid_size, "train": cfg.train_size}
        pretrain, evals = generate_pools(cfg, cfg.pretrain_size, sum(sizes.values()))
        # The test split comes first so that it does not depend on train/valid sizes.
        chunks: dict[str, list[_Problem]] = {"pretrain": pretrain[: cfg.pretrain_size]}
        start = 0
        for split, size in sizes.items():
            chunks[split] = evals[start : start + size]
            start += size
        return {
            split: [self._example(split, i, p) for i, p in enumerate(problems)]
            for split, problems in chunks.items()
        }

    def _example(self, split: str, index: int, problem: _Problem) -> Example:
        return Example(
            id=f"arith-{split}-{index}",
            question=problem.question,
            prompt=self.template.format(question=problem.question),
            gold_answer=str(problem.answer),
            gold_cot=problem.cot(),
        )

    def load_split(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._build()
        return list(self._splits[split])

    def extract_answer(self, response: str) -> str | None:
        return extract_answer(response)

    def is_correct(self, response: str, gold_answer: str) -> bool:
        return is_correct(response, gold_answer)


_MARKER = re.compile(r"final answer:", re.IGNORECASE)
# An optional sign, digits, then either an optional "." or a non-integer tail
# (captured so that "2.5" is rejected instead of being read as 2).
_NUMBER = re.compile(r"\s*([+-]?)\s*(\d+)(\.\d+|,\d)?")
_MAX_DIGITS = 30  # int() of very long digit strings is slow (and limited in 3.11+)


def extract_answer(response: str) -> str | None:
    """The integer after the last "Final answer:" as a canonical string ("-5", "28"), or None."""
    try:
        last = None
        for last in _MARKER.finditer(response):
            pass
        if last is None:
            return None
        match = _NUMBER.match(response, last.end())
        if match is None or match.group(3) or len(match.group(2)) > _MAX_DIGITS:
            return None
        value = int(match.group(2))
        return str(-value if match.group(1) == "-" else value)
    except Exception:  # untrusted text: any failure means "no answer"
        return None


def is_correct(response: str, gold_answer: str) -> bool:
    """Integer equality of the extracted answer with ``gold_answer``; never raises."""
    try:
        predicted = extract_answer(response)
        return predicted is not None and int(predicted) == int(str(gold_answer).strip())
    except Exception:
        return False


# dataset.name=arith: the builder ArithConfig's registration names.
def build_arith(cfg: ArithConfig) -> ArithTask:
    return ArithTask(cfg)
