"""MATH task: real records, the 4-shot prompt, boxed extraction, math-verify equality, the worker."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest_tasks import DATA, by_id, cached_task, make_task, needs_data

from irpo.tasks.math import EXEMPLARS, extract, hendrycks_equiv, is_equal, last_boxed

pytestmark = needs_data


def math_task():
    return cached_task("math")


# --------------------------------------------------------------------- real records


def test_splits_and_dropped_records():
    task = math_task()
    sizes = [len(task.load_split(s)) for s in ("train", "valid", "test")]
    # 7,500 train problems - 4 few-shot exemplars - 2 with an empty \boxed{} = 7,494
    assert sizes == [7494 - 500, 500, 5000]
    assert task.dropped == ["train/number_theory/7115.json", "train/number_theory/7117.json"]


def test_exemplars_are_excluded_and_shown_in_order():
    task = math_task()
    ids = {ex.id for s in ("train", "valid") for ex in task.load_split(s)}
    assert not ids & {path for path, _ in EXEMPLARS}
    prompt = task.load_split("test")[0].prompt
    assert prompt.count("Question: ") == 5 and prompt.count("Final answer: $\\boxed{") == 5
    firsts = ["Solve for $y$: $4+2.3y = 1.7y - 20$", "James has 7 apples.",
              "Points $(1,-5)$ and $(11,7)$", "Simplify\n\\[\\frac{\\sin x"]
    positions = [prompt.index(f"Question: {text}") for text in firsts]
    assert positions == sorted(positions)
    for answer in ("-40", "\\frac{1}{7}", "(6,1)", "\\tan x"):
        assert f"Final answer: $\\boxed{{{answer}}}$\n\n" in prompt


def test_zero_shot_and_too_many_shots():
    ex = make_task("math", num_shots=0, test_size=1).load_split("test")[0]
    assert ex.prompt.count("Question: ") == 1 and ex.prompt.endswith(f"Question: {ex.question}\nSolution:")
    with pytest.raises(ValueError, match=r"dataset\.num_shots=5"):
        make_task("math", num_shots=5)


def test_known_record_and_its_gold_cot():
    ex = by_id(math_task().load_split("test"), "test/precalculus/807.json")
    assert ex.gold_answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert ex.gold_cot.endswith("Final answer: $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$")
    assert math_task().is_correct(ex.gold_cot, ex.gold_answer)
    assert math_task().is_correct("So the answer is $\\boxed{(3, \\pi/2)}$.", ex.gold_answer)
    assert not math_task().is_correct("So the answer is $\\boxed{(3, \\pi)}$.", ex.gold_answer)


def test_trailing_period_inside_gold_box_is_dropped():
    ex = by_id(math_task().load_split("test"), "test/intermediate_algebra/1289.json")
    assert ex.gold_answer == "\\frac{7}{5} + \\frac{1}{5} i"
    assert math_task().is_correct("Final answer: $\\boxed{\\frac75+\\frac{i}{5}}$", ex.gold_answer)


def test_math500_answer_field_matches_boxed_solution():
    task = make_task("math500", valid_size=0)
    examples = {ex.id: ex for ex in task.load_split("test")}
    rows = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == len(examples) == 500
    for row in rows[:100]:
        assert task.is_correct(f"Final answer: $\\boxed{{{row['answer']}}}$", examples[row["unique_id"]].gold_answer)


def test_gold_cots_pass_their_checker_on_a_sample():
    task = math_task()
    for ex in task.load_split("test")[::25]:
        assert task.is_correct(ex.gold_cot, ex.gold_answer), ex.id


# ---------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\left(2, \\{3\\}\\right)}", "\\left(2, \\{3\\}\\right)"),
    ("\\fbox{7}", "7"),
    ("\\boxed{5} and an unclosed \\boxed{6", "5"),
    ("the answer is \\boxed 5$.", "5"),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("response,gold,expected", [
    # percent words are the gold's "\\%" (Math-Verify test_percent_notation)
    ("\\boxed{28 percent}", "28\\%", True),
    ("\\boxed{28 pct}", "28\\%", True),
    ("$\\boxed{28 percentage}$", "28\\%", True),
    ("\\boxed{$28$ %}", "28\\%", True),
    ("Final answer: 28 percent", "28", True),
    ("\\boxed{29 percent}", "28\\%", False),
    # the answer inside a "Final answer" sentence, not the whole line
    ("Final Answer: The largest $n$ is 34.", "34", True),
    ("Final Answer: The final answer is 12,000,023. I hope it is correct.", "12000023", True),
    ("Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct.", "3", True),
    ("Final answer: the domain of $f(x)$ is $(0, 1)$.", "(0,1)", True),
    ("Final answer: the domain of $f(x)$ is $(0, 1)$.", "[0,1)", False),
    ("Final Answer: The largest $n$ is 35.", "34", False),
    ("work \\boxed{200} more work\nFinal Answer: The final answer is $10,455$.", "10455", True),
    # no box and no final-answer line: the closing sentence's last math expression counts
    ("So, the ordered pair $(x, y)$ that solves the system is $(7, 6)$. <|im_start|>user", "(7,6)", True),
    ("Therefore, there are 12 sequences. I hope it is correct. <|im_start|>user", "12", True),
    ("Therefore $x \\geq 5$ is the solution.", "x \\ge 5", True),
    ("I do not know.", "5", False),
    ("We get 5, then the computation continues with", "5", True),  # cut off: read like GSM8K
])
def test_answer_sentences_and_percent_words(response, gold, expected):
    assert math_task().is_correct(response, gold) is expected


@pytest.mark.parametrize("response,gold,expected", [
    # several boxes in a row answer a gold that lists several values (Math-Verify open_thoughts)
    ("$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$", "(2, 2), (6, 2)", True),
    ("\\boxed{1},\\boxed{2},\\boxed{3}", "\\{1,2,3\\}", True),
    ("\\boxed{1} and \\boxed{2} and \\boxed{3}", "1, 2, 3", True),
    ("$\\boxed{k = 45} \\quad \\text{and} \\quad \\boxed{n = 2}$", "k = 45, n = 2", True),
    ("$x = \\boxed{1}$ and $y = \\boxed{2}$", "x = 1, y = 2", True),
    ("\\boxed{1} and \\boxed{2}", "1, 2, 3", False),
    ("\\boxed{(2, 2)} for part (a) and \\boxed{(6, 2)}", "(2, 2), (6, 2)", False),  # two parts
    # a one-value gold: the last box alone, whatever came before
    ("\\boxed{3} or \\boxed{5}", "5", True),
    ("\\boxed{5} or \\boxed{3}", "5", False),
    ("\\boxed{1}, \\boxed{000}", "1,000", False),
])
def test_several_boxes(response, gold, expected):
    assert math_task().is_correct(response, gold) is expected


def test_extract_falls_back_to_final_answer_and_cuts_a_hallucinated_next_question():
    assert extract("work...\nFinal answer: $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert extract("\\boxed{3}\nQuestion: next one\nSolution: \\boxed{9}") == "3"
    assert extract("\\boxed{" + "1" * 2000 + "}") is None  # longer than any real answer


# -------------------------------------------------------------------------- equality


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("0.333", "\\frac13", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),     # intervals
    ("(-\\infty, 3)", "(-\\infty,3]", False),
    ("5\\text{ cm}", "5", True),                 # units
    ("-3", "3", False),                          # negative numbers
    ("1{,}000", "1000", True),                   # thousands separators
    ("1,000", "1000", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("x=5", "5", True),
    ("11x + 6y + 5z + 86 = 0", "0", False),      # an equation is not the number 0
    ("45^\\circ", "45", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("(1,2)", "(2,1)", False),
    ("Evelyn", "\\text{Evelyn}", True),          # text answers (normalisation fallback)
    ("\\text{(C)}", "\\text{(C)}", True),
    ("2x+1", "1+2x", True),
])
def test_hard_cases(pred, gold, expected):
    assert is_equal(pred, gold) is expected


def test_hendrycks_normalisation_rules():
    assert hendrycks_equiv("\\dfrac12", "\\frac{1}{2}")
    assert hendrycks_equiv("0.5", "\\frac{1}{2}")
    assert hendrycks_equiv("k = 5", "5")
    assert hendrycks_equiv("10\\%", "10")
    assert not hendrycks_equiv("\\sqrt", "\\sqrt2")  # normalising fails -> raw comparison


def test_checks_work_from_threads_and_stay_bounded():
    results, times = [], []

    def work(response):
        start = time.perf_counter()
        results.append(math_task().is_correct(response, "\\frac{1}{2}"))
        times.append(time.perf_counter() - start)

    responses = ["\\boxed{0.5}", "\\boxed{10^{10^{10^{10}}}}", "\\boxed{2^{2^{30}}}", "\\boxed{1/2}"]
    threads = [threading.Thread(target=work, args=(r,)) for r in responses]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [False, False, True, True]
    assert max(times) < 5.0


def test_hub_reads_all_seven_subject_configs(monkeypatch):
    import sys

    from irpo.tasks import build_task
    from irpo.tasks.common import HubTaskConfig

    row = {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1",
           "type": "Algebra"}
    calls = []

    class Fake:
        @staticmethod
        def load_dataset(name, config=None, split=None):
            calls.append((name, config, split))
            return [row]

    monkeypatch.delenv("IRPO_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", Fake)
    test = build_task(HubTaskConfig(name="math", num_shots=0)).load_split("test")
    assert [ex.gold_answer for ex in test] == ["2"] * 7
    assert [c[1] for c in calls] == ["algebra", "counting_and_probability", "geometry",
                                     "intermediate_algebra", "number_theory", "prealgebra", "precalculus"]
    assert {c[0] for c in calls} == {"EleutherAI/hendrycks_math"} and {c[2] for c in calls} == {"test"}
    with pytest.raises(ValueError, match="exemplar .* is not in this training data"):
        build_task(HubTaskConfig(name="math", num_shots=4)).load_split("test")
