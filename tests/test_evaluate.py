"""irpo.evaluate: greedy accuracy and maj@k, and the majority vote itself.

The vote counts identical answers as one, merges answers a task calls the same
(MATH: ``\\frac{1}{2}``, ``0.5``, ``\\dfrac12``), and breaks ties by the group seen first.
Expected values are counted by hand from the scripted responses.
"""

from __future__ import annotations

import json

import pytest

from irpo.evaluate import evaluate, majority
from irpo.sampling import Generation
from irpo.tasks import Example
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.tasks.common import HubTaskConfig
from irpo.tasks.math import MathTask

HALF = [r"\frac{1}{2}", "0.5", r"\dfrac12", r"\frac12", "1/2", ".5"]


def test_majority_counts_identical_answers_and_skips_missing_ones():
    assert majority(["4", "7", "7", None, "4", "7"]) == 1  # 7 has 3 votes, first at index 1
    assert majority([None, "5"]) == 1
    assert majority([None, None]) is None and majority([]) is None


def test_majority_ties_go_to_the_answer_seen_first():
    assert majority(["7", "3", "3", "7"]) == 0
    assert majority(["3", "7", "7", "3"]) == 0
    assert majority([None, "9", "2"]) == 1  # one vote each: the first answer there is


@pytest.fixture(scope="module")
def math_task():
    return MathTask(HubTaskConfig(name="math"))  # the checker only: no data is read


def vote(task, answers, max_checks=8):
    return majority(answers, task.vote_key, task.same_answer, max_checks=max_checks)


def test_math_spellings_of_one_half_are_one_vote(math_task):
    for a in HALF:
        assert math_task.vote_key(a) == r"\frac{1}{2}", a  # the cheap key alone joins them
        assert math_task.same_answer(a, r"\frac{1}{2}") and math_task.same_answer(r"\frac{1}{2}", a)
    assert not math_task.same_answer("3", r"\frac{1}{2}")
    assert not math_task.same_answer(r"\frac{1}{3}", "0.5")
    votes = ["3", r"\frac{1}{2}", "3", "0.5", r"\dfrac12"]
    assert majority(votes) == 0  # as strings: "3" twice, each spelling of 1/2 once
    assert vote(math_task, votes) == 1  # as answers: 1/2 three times, 3 twice


def test_math_answers_equal_only_by_math_verify_merge_within_the_budget(math_task):
    # 2 / 2.0 / 2.00 and 1,000 / 1000 have different keys; math-verify calls them equal.
    votes = ["7", "2", "7", "2.0", "2.00", "1000"]
    assert vote(math_task, votes, max_checks=0) == 0  # keys only: 7 twice, the rest once
    assert vote(math_task, votes) == 1  # {2, 2.0, 2.00} three times
    # Largest first: {7} x2 is kept; {2} vs 7 (1 check), {2.0} vs 7, vs 2 (merge; 3 checks),
    # {2.00} vs 7 (4 checks, budget spent): 2 has two votes, ties 7, which came first.
    assert vote(math_task, votes, max_checks=4) == 0
    assert vote(math_task, votes, max_checks=5) == 1


def test_math_tie_between_spelt_groups_goes_to_the_group_seen_first(math_task):
    votes = ["0.5", "2", r"\frac12", "2.0"]  # {0.5, \frac12} and {2, 2.0}: two votes each
    assert vote(math_task, votes) == 0
    assert vote(math_task, ["2", "0.5", r"\frac12", "2.0"]) == 0


class Scripted:
    """Greedy and sampled responses fixed per prompt (what a sampler would return)."""

    def __init__(self, greedy: dict[str, str], samples: dict[str, list[str]]):
        self.greedy, self.samples = greedy, samples

    def generate(self, prompts, n, temperature, max_new_tokens, seed, desc="", first_index=0):
        table = {p: [self.greedy[p]] for p in prompts} if temperature == 0 else self.samples
        out = []
        for p in prompts:
            assert len(table[p]) == n
            out.append([Generation(text=t, num_tokens=len(t.split()), finished=True) for t in table[p]])
        return out


def ex(i: int, gold: str) -> Example:
    return Example(id=f"q{i}", question=f"q{i}", prompt=f"Question {i}\nSolution:", gold_answer=gold)


def boxed(answer: str) -> str:
    return f"Some steps.\nFinal answer: $\\boxed{{{answer}}}$"


def test_evaluate_math_maj_at_k_votes_by_answer_not_spelling(math_task, tmp_path):
    examples = [ex(0, r"\frac{1}{2}"), ex(1, "3"), ex(2, "10")]
    greedy = {examples[0].prompt: boxed("0.5"), examples[1].prompt: boxed("4"),
              examples[2].prompt: "no answer here"}
    samples = {
        examples[0].prompt: [boxed("3"), boxed("0.5"), boxed("3"), boxed(r"\dfrac12"), boxed(r"\frac{1}{2}")],
        examples[1].prompt: [boxed("3"), boxed("4"), boxed("4"), boxed("3"), boxed("5")],  # tie: 3 first
        examples[2].prompt: ["nothing", boxed("12"), boxed("11"), boxed("12"), boxed("10")],
    }
    out = tmp_path / "predictions.jsonl"
    m = evaluate(math_task, Scripted(greedy, samples), examples, max_new_tokens=64, maj_k=5,
                 maj_temperature=0.7, seed=0, prefix="test", out_file=out)
    assert m["test/accuracy"] == pytest.approx(1 / 3)  # only q0's greedy 0.5 = 1/2
    assert m["test/maj_at_k"] == pytest.approx(2 / 3)  # q0 (1/2 x3 vs 3 x2) and q1 (tie -> 3)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["majority_answer"] for r in recs] == ["0.5", "3", "12"]
    assert [r["maj_correct"] for r in recs] == [True, True, False]
    assert [r["correct"] for r in recs] == [True, False, False]


def test_evaluate_arith_greedy_and_majority(tmp_path):
    task = ArithTask(ArithConfig(train_size=0, valid_size=0, test_size=2))
    examples = [ex(0, "12"), ex(1, "7")]
    final = lambda n: f"x = {n}\nFinal answer: {n}"
    greedy = {examples[0].prompt: final(12), examples[1].prompt: final(8)}
    samples = {examples[0].prompt: [final(5), final(12), final(5), "?"],
               examples[1].prompt: [final(7), final(9), final(7), final(9)]}
    m = evaluate(task, Scripted(greedy, samples), examples, max_new_tokens=16, maj_k=4,
                 maj_temperature=0.7, seed=0, prefix="valid")
    assert m == {"valid/accuracy": 0.5, "valid/response_tokens": 6.0,
                 "valid/maj_at_k": 0.5}  # q0: 5 beats 12; q1: 7 and 9 tie, 7 first;
    # response tokens: the scripted 6 words of each greedy response
