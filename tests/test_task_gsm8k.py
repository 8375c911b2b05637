"""GSM8K task: real records, the split rules, the prompt, numeric answer checking, loader errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest_tasks import DATA, cached_task, make_task, needs_data
from omegaconf import OmegaConf

from irpo.tasks import build_task
from irpo.tasks.__main__ import dataset_config
from irpo.tasks.common import DataNotFoundError, HubTaskConfig, read_jsonl
from irpo.tasks.gsm8k import GSM8K, canonical, gold_cot, parse_number

pytestmark = needs_data


def gsm8k():
    return cached_task("gsm8k")


# --------------------------------------------------------------------- real records


def test_split_sizes_follow_the_paper():
    task = gsm8k()
    assert len(task.load_split("valid")) == 1000  # the paper's held-out training prompts
    assert len(task.load_split("train")) == 7473 - 1000
    assert len(task.load_split("test")) == 1319


def test_first_test_record_janets_ducks():
    ex = gsm8k().load_split("test")[0]
    assert ex.id == "gsm8k/test/0"
    assert ex.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert ex.gold_answer == "18"
    assert ex.gold_cot.endswith("She makes 9 * 2 = $18 every day at the farmer’s market.\nFinal answer: 18")
    assert "<<" not in ex.gold_cot and "####" not in ex.gold_cot
    assert ex.prompt.endswith(f"Question: {ex.question}\nSolution:")
    assert 'please use the format "Final answer: ..."' in ex.prompt


def test_thousands_separator_gold_is_canonical():
    rec = read_jsonl(DATA / "gsm8k" / "train.jsonl")[345]
    assert rec["answer"].endswith("#### 1,080")
    assert gold_cot(rec["answer"]).endswith("Final answer: 1080")
    task = make_task("gsm8k", valid_size=0)
    ex = task.load_split("train")[345]
    assert ex.gold_answer == "1080"
    assert task.is_correct("So he keeps $1,080.", ex.gold_answer)
    assert task.is_correct("Final answer: $1,080.00", ex.gold_answer)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_every_gold_cot_passes_its_own_checker(split):
    task = gsm8k()
    examples = task.load_split(split)
    assert all(task.is_correct(ex.gold_cot, ex.gold_answer) for ex in examples)
    assert all(task.extract_answer(ex.gold_cot) == ex.gold_answer for ex in examples)


def test_valid_is_held_out_deterministic_and_disjoint():
    a, b = make_task("gsm8k"), make_task("gsm8k")
    valid_ids = [ex.id for ex in a.load_split("valid")]
    assert valid_ids == [ex.id for ex in b.load_split("valid")]
    train_ids = {ex.id for ex in a.load_split("train")}
    assert not train_ids & set(valid_ids)
    assert len(train_ids | set(valid_ids)) == 7473


def test_sizes_subsample_and_errors_name_the_field():
    task = make_task("gsm8k", train_size=10, valid_size=5, test_size=7)
    assert [len(task.load_split(s)) for s in ("train", "valid", "test")] == [10, 5, 7]
    with pytest.raises(ValueError, match=r"dataset\.train_size=7000 exceeds the 6473"):
        make_task("gsm8k", train_size=7000).load_split("train")
    with pytest.raises(ValueError, match=r"dataset\.valid_size=8000"):
        make_task("gsm8k", valid_size=8000).load_split("valid")
    with pytest.raises(ValueError, match=r"dataset\.test_size=2000"):
        make_task("gsm8k", test_size=2000).load_split("test")
    with pytest.raises(ValueError, match="no 'pretrain' split"):
        gsm8k().load_split("pretrain")


def test_prompt_template_override_keeps_latex_braces():
    template = "Q: {question} \\boxed{} \\frac{{1}}{2} {other}\nA:"
    ex = make_task("gsm8k", prompt_template=template, test_size=1).load_split("test")[0]
    # {{ }} are str.format escapes; lone braces and unknown names stay as written
    assert ex.prompt == "Q: " + ex.question + " \\boxed{} \\frac{1}{2} {other}\nA:"
    with pytest.raises(ValueError, match="placeholder"):
        make_task("gsm8k", prompt_template="no placeholder here")


def test_config_yaml_holds_the_paper_defaults():
    cfg = dataset_config("gsm8k", None)
    assert (cfg.samples_per_prompt, cfg.pairs_per_prompt, cfg.iterations) == (30, 10, 4)
    assert cfg.temperature == [0.8, 0.8, 1.3]
    assert cfg.add_gold_to_winners is True and cfg.valid_size == 1000 and cfg.num_shots == 0
    assert cfg.hub_name == "openai/gsm8k" and cfg.hub_config == "main"


def test_config_composes_with_hydra_schema():
    from hydra import compose, initialize_config_dir

    from irpo.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    for name in ("gsm8k", "math", "arc_challenge"):
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(config_name=None, overrides=[f"+dataset={name}"])
        ds = OmegaConf.to_object(cfg.dataset)
        assert isinstance(ds, HubTaskConfig) and ds.name == name


# ------------------------------------------------------------------ answer checking


@pytest.mark.parametrize("response,gold,expected", [
    ("Final answer: 1/2", "0.5", True),                    # fraction vs decimal
    ("Final answer: \\frac{3}{4}", "0.75", True),
    ("Final answer: 0.50", "1/2", True),
    ("Final answer: 18 eggs", "18", True),                  # units
    ("Final answer: $18.00", "18", True),                   # currency, trailing zeros
    ("Final answer: -3 degrees", "-3", True),               # negative numbers
    ("Final answer: -3", "3", False),
    ("Final answer: 3", "-3", False),
    ("Final answer: 1,000,000", "1000000", True),           # thousands separators
    ("Final answer: 50%", "50", True),                      # percent: the number written
    ("Final answer: 5 + 3 = 8", "8", True),                 # the result, not the first term
    ("Final answer: 18.5", "18", False),
    ("Final answer: 180", "18", False),
    ("Final answer: 7\nFinal answer: 9", "9", True),        # the LAST final answer
    ("Final answer: 7\nFinal answer: 9", "7", False),
    ("She has 3 apples, then 5 more, so 8 in all.", "8", True),  # no marker: last number
    ("Final answer: eighteen", "18", False),
    ("", "18", False),
    ("Final answer: **18**", "18", True),
    ("Final answer: \\boxed{18}", "18", True),
    ("The boxes hold 10-15 items. Final answer: 12", "12", True),
    ("Final answer: .5", "0.5", True),                      # a decimal without its leading 0
    ("Final answer: $.75 per cup", "3/4", True),
    ("Final answer: -.25", "-0.25", True),
    ("Final answer: .5", "5", False),
    ("It costs $.50 in all.", "0.5", True),                 # no marker: last number
])
def test_hard_cases(response, gold, expected):
    assert GSM8K.is_correct(gsm8k(), response, gold) is expected


def test_extract_answer_canonical_spelling():
    task = gsm8k()
    assert task.extract_answer("Final answer: 1,080.00 dollars") == "1080"
    assert task.extract_answer("Final answer: 5/2") == "2.5"
    assert task.extract_answer("Final answer: 2/3") == "2/3"
    assert task.extract_answer("no numbers at all") is None
    assert canonical(parse_number("-0.125")) == "-0.125"


def test_huge_numbers_are_not_numbers():
    task = gsm8k()
    assert task.extract_answer("Final answer: " + "9" * 100000) is None
    assert not task.is_correct("Final answer: " + "9" * 100000, "9" * 100000)


# --------------------------------------------------------------------------- loader


def test_task_folder_layout_and_registry():
    cfg = dataset_config("gsm8k", str(DATA / "gsm8k"))
    cfg.valid_size = 0
    task = build_task(cfg)
    assert isinstance(task, GSM8K) and len(task.load_split("test")) == 1319


def test_missing_dir_error_lists_what_was_tried(tmp_path):
    task = make_task("gsm8k")
    task.cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=r"dataset\.data_dir=.*nowhere.*not a directory"):
        task.load_split("test")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    good = '{"question": "q", "answer": "a\\n#### 1"}\n'
    (folder / "test.jsonl").write_text(good + good + '{"question": "broken\n')
    task = make_task("gsm8k")
    task.cfg.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"gsm8k/test\.jsonl:3: malformed JSON line"):
        task.load_split("test")


def test_nothing_reachable_error_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("IRPO_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    task = build_task(HubTaskConfig(name="gsm8k"))
    with pytest.raises(DataNotFoundError) as err:
        task.load_split("test")
    message = str(err.value)
    assert "IRPO_DATA_DIR (not set)" in message and "datasets` package is not installed" in message
    assert "set dataset.data_dir=" in message and "export IRPO_DATA_DIR=" in message


def test_env_var_is_used_when_data_dir_is_unset(monkeypatch):
    monkeypatch.setenv("IRPO_DATA_DIR", str(DATA))
    task = build_task(HubTaskConfig(name="gsm8k", test_size=3))
    assert [ex.gold_answer for ex in task.load_split("test")] != []


class FakeDatasets:
    """Stands in for the `datasets` package: records the calls, serves rows (no network)."""

    def __init__(self, rows_by_split):
        self.rows, self.calls = rows_by_split, []

    def load_dataset(self, name, config=None, split=None):
        self.calls.append((name, config, split))
        return self.rows[split]

    def load_from_disk(self, path):
        self.calls.append(("disk", path))
        return self.rows


GSM_ROW = {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}


def test_hub_is_read_through_datasets_when_nothing_local(monkeypatch):
    fake = FakeDatasets({"train": [GSM_ROW] * 3, "test": [GSM_ROW]})
    monkeypatch.delenv("IRPO_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = build_task(HubTaskConfig(name="gsm8k", valid_size=1))
    assert [ex.gold_answer for ex in task.load_split("test")] == ["4"]
    assert len(task.load_split("train")) == 2
    assert fake.calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    assert task.load_split("test")[0].gold_cot == "2+2=4\nFinal answer: 4"


def test_saved_datasets_folder_is_read_with_load_from_disk(monkeypatch, tmp_path):
    fake = FakeDatasets({"train": [GSM_ROW], "test": [GSM_ROW, GSM_ROW]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    task = build_task(HubTaskConfig(name="gsm8k", data_dir=str(tmp_path)))
    assert len(task.load_split("test")) == 2
    assert fake.calls == [("disk", str(tmp_path))]
