"""The synthetic arithmetic task: data determinism, split hygiene, gold CoTs, answer checking."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irpo.tasks import build_task
from irpo.tasks.arith import ArithConfig, ArithTask, build_arith, extract_answer, is_correct
from irpo.tasks.base import SPLITS

CFG = ArithConfig(pretrain_size=2000, train_size=64, valid_size=32, test_size=48)
STEP = re.compile(r" (\d+) ([-+*/]) (\d+) = (\d+)\.")


@pytest.fixture(scope="module")
def splits():
    task = build_arith(CFG)
    return {s: task.load_split(s) for s in SPLITS}


def test_sizes_and_ids(splits):
    assert [len(splits[s]) for s in SPLITS] == [2000, 64, 32, 48]
    assert splits["test"][17].id == "arith-test-17"
    assert len({e.id for s in SPLITS for e in splits[s]}) == 2000 + 64 + 32 + 48


def test_deterministic(splits):
    again = build_arith(CFG)
    for s in SPLITS:
        assert again.load_split(s) == splits[s]
    other = build_arith(dataclasses.replace(CFG, data_seed=CFG.data_seed + 1))
    assert other.load_split("test") != splits["test"]


def test_splits_disjoint(splits):
    seen: dict[str, str] = {}
    for s in SPLITS:
        for e in splits[s]:
            assert seen.setdefault(e.question, s) == s, f"{e.question!r} in {seen[e.question]} and {s}"
    assert len(seen) == sum(len(v) for v in splits.values())


def test_test_and_pretrain_splits_do_not_depend_on_other_sizes(splits):
    bigger = build_arith(dataclasses.replace(CFG, train_size=200, valid_size=50))
    assert bigger.load_split("test") == splits["test"]
    assert bigger.load_split("pretrain") == splits["pretrain"]
    more_test = build_arith(dataclasses.replace(CFG, test_size=100))
    assert more_test.load_split("test")[:48] == splits["test"]


def test_prompt_format(splits):
    e = splits["train"][0]
    assert e.prompt == f"Question: {e.question}\nAnswer:"
    assert e.question.endswith("have now?")
    custom = build_arith(dataclasses.replace(CFG, prompt_template="Q: {question}\nA:"))
    assert custom.load_split("train")[0].prompt == f"Q: {e.question}\nA:"


def test_gold_cot_arithmetic_is_right(splits):
    for s in SPLITS:
        for e in splits[s]:
            steps = STEP.findall(e.gold_cot)
            assert CFG.min_ops <= len(steps) <= CFG.max_ops, e
            assert e.gold_cot == "".join(f" {a} {op} {b} = {r}." for a, op, b, r in steps) + (
                f" Final answer: {e.gold_answer}"
            )
            # The chain starts from the number the story starts with.
            start = re.search(r" has (\d+) ", e.question).group(1)
            assert steps[0][0] == start, e
            previous = start
            for a, op, b, r in steps:
                a, b, r = int(a), int(b), int(r)
                assert str(a) == previous  # each step continues from the last result
                expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
                assert expected == r, (e.gold_cot, a, op, b)
                assert 0 <= r <= CFG.max_value and 1 <= b <= CFG.max_operand
                previous = str(r)
            assert previous == e.gold_answer
            assert is_correct(e.gold_cot, e.gold_answer)


def test_operations_are_varied(splits):
    ops = {op for e in splits["pretrain"] for _, op, _, _ in STEP.findall(e.gold_cot)}
    assert ops == {"+", "-", "*", "/"}
    answers = [e.gold_answer for e in splits["pretrain"]]
    # No single answer dominates (a model cannot score by always guessing one number).
    assert max(answers.count(a) for a in set(answers)) < 0.08 * len(answers)  # 6.8% at 9/99


def test_sizes_must_be_given():
    with pytest.raises(ValueError, match="dataset.train_size"):
        ArithTask(ArithConfig(train_size=None, valid_size=10, test_size=10))
    with pytest.raises(ValueError, match="dataset.test_size"):
        ArithTask(ArithConfig(train_size=10, valid_size=10, test_size=None))


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        build_arith(CFG).load_split("dev")


def test_registered():
    task = build_task(CFG)  # irpo.tasks.base's registry; arith registered itself on import
    assert task.name == "arith" and isinstance(task, ArithTask)


def test_default_sized_pretrain_split():
    # Speed is not asserted here (a loaded machine makes timed tests flaky); ~0.6 s idle.
    task = build_arith(ArithConfig(pretrain_size=20000, train_size=512, valid_size=200, test_size=500))
    pretrain = task.load_split("pretrain")
    assert len(pretrain) == 20000 and len({e.prompt for e in pretrain}) > 19000


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 3 + 4 = 7. Final answer: 7", "7"),
        ("Final answer: 7.", "7"),
        ("Final answer: -12", "-12"),
        ("Final answer:+5", "5"),
        ("final answer: 0042", "42"),
        ("Final answer: 3. Then again. Final answer: 9", "9"),  # the last one wins
        ("Final answer: 3. Final answer: none", None),  # the last marker decides
        ("Final answer: 2.5", None),
        ("Final answer: 1,000", None),
        ("The answer is 7", None),
        ("", None),
        ("Final answer:", None),
        ("Final answer: " + "9" * 5000, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct(" 1 + 1 = 2. Final answer: 2", "2")
    assert is_correct("Final answer: 2.", " 2 ")
    assert not is_correct("Final answer: 3", "2")
    assert not is_correct("Final answer: 2", "not a number")
    assert not is_correct("no answer", "2")
    assert is_correct("Final answer: -4", "-4")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_is_correct_never_raises(response, gold):
    assert is_correct(response, gold) in (True, False)
    assert extract_answer(response) is None or re.fullmatch(r"-?\d+", extract_answer(response))


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.text(alphabet=" .,:abc\n", max_size=20))
def test_extract_roundtrip(value, prefix):
    assert extract_answer(f"{prefix} Final answer: {value}") == str(value)
    assert is_correct(f"{prefix}Final answer: {value}.", str(value))
