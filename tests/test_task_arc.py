"""ARC-Challenge task: the paper's data setup, option rendering (numeric labels, 3/5 choices), letters."""

from __future__ import annotations

import pytest
from conftest_tasks import by_id, cached_task, make_task, needs_data

from irpo.tasks.arc import extract_letter

pytestmark = needs_data

FORMATS = (
    "Final answer: ({L})", "Final answer: {L}", "Final Answer: **{L}**", "final answer is {L}.",
    "The answer is {L}.", "The answer is ({L})", "Answer: {L}", "Therefore ({L})",
    "So the correct answer is option {L}.",
)


def arc():
    return cached_task("arc_challenge")


def test_train_is_easy_plus_challenge_and_test_is_challenge():
    task = make_task("arc_challenge", valid_size=0)
    train, test = task.load_split("train"), task.load_split("test")
    assert len(train) == 2251 + 1119 and len(test) == 1172
    assert train[0].id.startswith("Mercury_") and "TIMSS_1995_8_J7" in {ex.id for ex in test}
    held = make_task("arc_challenge")  # valid_size=300 from the yaml
    assert len(held.load_split("valid")) == 300 and len(held.load_split("train")) == 3370 - 300


def test_numeric_labels_are_shown_and_stored_as_letters():
    ex = by_id(arc().load_split("test"), "NYSEDREGENTS_2008_8_34")  # labels 1-4, answerKey "2"
    assert ex.gold_answer == "B"
    assert "\n(A) " in ex.question and "\n(D) " in ex.question and "(1)" not in ex.question
    assert arc().is_correct("Final answer: (B)", ex.gold_answer)
    assert not arc().is_correct("Final answer: (2)", ex.gold_answer)


def test_three_and_five_choice_questions():
    test = arc().load_split("test")
    three = by_id(test, "NYSEDREGENTS_2012_8_42")  # labels 1-3, answerKey "2"
    assert three.gold_answer == "B" and "\n(C) " in three.question and "(D)" not in three.question
    five = by_id(test, "TIMSS_1995_8_J7")
    assert five.gold_answer == "D" and "\n(E) " in five.question


def test_prompt_is_zero_shot_with_options():
    ex = arc().load_split("test")[0]
    assert ex.gold_cot == f"Final answer: ({ex.gold_answer})"
    assert arc().is_correct(ex.gold_cot, ex.gold_answer)
    assert ex.prompt.startswith("Your task is to answer the question below.")
    assert 'use the format "Final answer: (X)"' in ex.prompt
    assert ex.prompt.endswith(f"Question: {ex.question}\nSolution:")
    stem = ex.question.split("\n")[0]
    custom = make_task("arc_challenge", prompt_template="{stem}\n{choices}\nAnswer:", test_size=5)
    assert any(e.prompt == e.question + "\nAnswer:" for e in custom.load_split("test"))
    assert stem


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gold_letter_in_every_format_passes(split):
    task = arc()
    for ex in task.load_split(split):
        for fmt in FORMATS:
            assert task.is_correct("Reasoning...\n" + fmt.format(L=ex.gold_answer), ex.gold_answer)


@pytest.mark.parametrize("text,expected", [
    ("Final answer: (C)", "C"),
    ("Final answer: (B) Planetary years will become longer.", "B"),
    ("I think the answer is (B).\nFinal answer: (A)", "A"),   # the final answer wins
    ("Final answer: A bacterial population", None),            # prose, not an option
    ("The final answer is a tie.", None),
    ("so the answer is B", "B"),
    ("Answer: (D) because it is.", "D"),
    ("... which leaves (C)", "C"),
    ("... so it is C.", "C"),
    ("Final answer: (2)", None),
    ("nothing here", None),
])
def test_extraction_variants(text, expected):
    assert extract_letter(text) == expected


def test_final_answer_b_matches_the_answer_is_b():
    task = arc()
    assert task.extract_answer("Final answer: (B)") == task.extract_answer("the answer is B") == "B"
    assert task.is_correct("the answer is B", "B") and not task.is_correct("the answer is B", "C")


def test_hub_rows_in_the_allenai_layout(monkeypatch):
    import sys

    from irpo.tasks import build_task
    from irpo.tasks.common import HubTaskConfig

    row = {"id": "x1", "question": "Which is a metal?", "answerKey": "3",
           "choices": {"text": ["wood", "glass", "iron"], "label": ["1", "2", "3"]}}
    calls = []

    class Fake:
        @staticmethod
        def load_dataset(name, config=None, split=None):
            calls.append((name, config, split))
            return [row]

    monkeypatch.delenv("IRPO_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", Fake)
    task = build_task(HubTaskConfig(name="arc_challenge"))
    train, test = task.load_split("train"), task.load_split("test")
    assert len(train) == 2 and len(test) == 1
    assert test[0].gold_answer == "C" and test[0].question.endswith("\n(C) iron")
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Challenge", "train"),
                     ("allenai/ai2_arc", "ARC-Challenge", "test")]
