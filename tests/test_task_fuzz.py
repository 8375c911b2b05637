"""Model output is untrusted: fuzz the extractors and checkers of gsm8k, math and arc_challenge.

Every input, arbitrary or adversarial, must give ``extract_answer`` -> str | None and
``is_correct`` -> bool, without an exception, within 5 s wall clock (the checks are bounded to
~1 s; 5 s leaves room for a loaded CI machine), and without running any of its text as code.
Building a task reads no data, so these tests run without the real data too.
Counts of inputs tried are printed at the end of the module (``pytest -s``); raise
``IRPO_FUZZ_EXAMPLES`` for a longer campaign.
"""

from __future__ import annotations

import io
import os
import time
import tokenize
from collections import Counter
from pathlib import Path

import pytest
from conftest_tasks import cached_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irpo.tasks.math import answers_equal, warm_up
from irpo.tasks.timeout import BoundedPool, CheckTimeout, hang

TASKS = ("gsm8k", "math", "arc_challenge")
GOLDS = {"gsm8k": ("18", "0.5"), "math": ("\\frac{1}{2}", "10^{10^{10^{10}}}"), "arc_challenge": ("C",)}
BOUND_S = 5.0
EXAMPLES = int(os.environ.get("IRPO_FUZZ_EXAMPLES", "150"))
COUNTS: Counter = Counter()
SLOWEST: dict[str, float] = {}

PIECES = (
    "\\boxed{", "\\fbox{", "{", "}", "\\frac", "\\dfrac{", "^{", "_{", "10", "9" * 60, "0.", "-",
    "Final answer:", "final answer is", "The answer is", "Answer:", "(", ")", "[", "]", "$", "\\",
    "=", ",", "/", "%", "!", "\\sqrt", "\\sum_{n=1}^{", "\\prod", "\\int", "\\infty", "x", "e^{",
    "\\text{", "\\left(", "\\right)", "\\begin{pmatrix}", "&", "\\\\", "\\end{pmatrix}", "(A)",
    "B.", " ", "\n", "\nQuestion:", "__import__('os')", ".system('true')", "lambda:", "\\{",
    "\\}", "\u2212", "\x00", "\ud7ff", "**", "#### ", "1,000,", "\\cdot", "\\times", "\\pi",
)
adversarial = st.lists(st.sampled_from(PIECES), max_size=80).map("".join)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def timed(name: str, call, *args):
    """Run one extractor/checker call; it must return within BOUND_S."""
    start = time.perf_counter()
    result = call(*args)
    took = time.perf_counter() - start
    SLOWEST[name] = max(SLOWEST.get(name, 0.0), took)
    assert took < BOUND_S, f"{name} took {took:.2f}s on {str(args[0])[:80]!r}"
    return result


def check_one(name: str, text: str) -> None:
    """The contract every input must meet."""
    task = cached_task(name)
    answer = timed(name, task.extract_answer, text)
    assert answer is None or isinstance(answer, str)
    for gold in GOLDS[name]:
        assert isinstance(timed(name, task.is_correct, text, gold), bool)
    COUNTS[name] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz inputs tried per task: {dict(COUNTS)}; slowest single call (s): "
          + ", ".join(f"{k}={v:.3f}" for k, v in SLOWEST.items()))


@pytest.mark.parametrize("name", TASKS)
@FUZZ
@given(text=st.text(max_size=3000))
def test_arbitrary_text(name, text):
    check_one(name, text)


@pytest.mark.parametrize("name", TASKS)
@FUZZ
@given(text=adversarial)
def test_adversarial_latex_and_markers(name, text):
    check_one(name, text)


HOSTILE = (
    "\\boxed{" * 10000,
    "\\boxed{" * 10000 + "1" + "}" * 10000,
    "\\boxed{" + "9" * 100000 + "}",
    "Final answer: " + "9" * 100000,
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{1000000!}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{\\sum_{n=1}^{10^{10}} n^{n}}",
    "\\boxed{\\prod_{k=1}^{10^{12}} k}",
    "\\boxed{" + "\\frac{1}{" * 120 + "2" + "}" * 120 + "}",
    "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "\\boxed{\\begin{pmatrix}" + "&".join(["x^{99}+y^{99}"] * 60) + "\\end{pmatrix}}",
    "(" * 100000 + "Final answer: (A)",
    "Final answer: " + "1," * 50000,
    "Final answer: " + "\\frac{" * 20000,
    "The answer is " * 20000,
    "x" * 2_000_000 + " Final answer: 18",
)


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_inputs_are_bounded(name, text):
    check_one(name, text)


def test_planted_side_effects_never_happen(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"exec(\"open('{marker}', 'w').close()\")",
        f"eval(compile(\"open('{marker}','w')\", 'x', 'exec'))",
        f"(lambda: __import__('pathlib').Path('{marker}').touch())()",
        f"Symbol('x').__class__.__init__.__globals__['__builtins__']['open']('{marker}','w')",
    ]
    for payload in payloads:
        for wrapped in (payload, f"\\boxed{{{payload}}}", f"Final answer: {payload}",
                        f"Final answer: ${payload}$", f"The answer is {payload}"):
            for name in TASKS:
                check_one(name, wrapped)
                assert cached_task(name).is_correct(wrapped, payload) in (True, False)
            answers_equal(payload, "5")  # the worker's parsing, run here in the test process
            answers_equal("5", payload)
    assert not marker.exists()


def test_worker_that_never_returns_is_killed_and_replaced():
    # warm_up as the product's pool does: a fresh worker's imports are not timed (without it,
    # the replacement's first check could take over the 1 s limit on a cold start).
    pool = BoundedPool({"math_equal": answers_equal, "selftest_hang": hang}, warm_up=warm_up,
                       max_workers=1, limit_s=1.0)
    try:
        assert pool.call("math_equal", "\\frac{1}{2}", "0.5") is True
        start = time.perf_counter()
        with pytest.raises(CheckTimeout):
            pool.call("selftest_hang", 30)  # SIGALRM blocked: only the kill can end it
        assert time.perf_counter() - start < 2.0
        assert pool.call("math_equal", "2", "2.0") is True  # a fresh worker took over
    finally:
        pool.close()


NEVER = {"parse_expr", "sympify", "ExprExtractionConfig", "parse_latex"}  # string -> code parsers
NO_CALL = {"eval", "exec"}  # a builtin call; ``model.eval()`` and a field named eval are fine


def forbidden(source: str) -> list[tuple[int, str]]:
    """(line, name) of each forbidden use in Python ``source`` (strings and comments ignored)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    hits = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        prev = tokens[i - 1].string if i else ""
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.string in NEVER or (tok.string in NO_CALL and nxt == "(" and prev != "."):
            hits.append((tok.start[0], tok.string))
    return hits


def test_the_scanner_finds_what_it_should():
    assert forbidden("y = eval(text)\nfrom sympy import sympify\n") == [(1, "eval"), (2, "sympify")]
    assert forbidden("model.eval()\neval: int = 0\nx = 'eval(x)'  # exec(y)\n") == []


def test_no_eval_of_model_text_anywhere_in_irpo():
    """No eval/exec call and no sympy/math-verify string-to-code parser in the package's code."""
    root = Path(__file__).resolve().parents[1] / "irpo"
    hits = [f"{path.relative_to(root.parent)}:{line}: {name}"
            for path in sorted(root.rglob("*.py")) for line, name in forbidden(path.read_text())]
    assert hits == []
