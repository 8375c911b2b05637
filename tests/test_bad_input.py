"""Bad input gets one clear line naming the config field, or the file and line, before
anything is created.

* a data record without a required field: ``<file>:<line>: record has no '<field>' field``;
* a data directory that is not there: the message names ``dataset.data_dir`` and the path;
* ``samples_per_prompt`` below what a pairs method needs: a ConfigError naming the field;
* an unknown ``method.loss``: a ConfigError naming the field and listing the known losses;
* ``dataset=nosuch`` lists only real options, not the structured-config schemas.

The end-to-end ones run ``python -m irpo.main`` (conftest.run_main); each fails at start-up,
in seconds, and must leave nothing under ``output_root`` but Hydra's own log folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_main
from conftest_tasks import DATA, needs_data
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from irpo.config import ConfigError, register_configs, to_config
from irpo.config_rules import validate
from irpo.tasks import build_task
from irpo.tasks.__main__ import dataset_config
from irpo.tasks.common import DataError, DataNotFoundError, Record

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# Small and quick: one iteration, and the run must stop before it starts anyway.
FAST = ["experiment=smoke"]
GSM8K_SMALL = ["dataset=gsm8k", "dataset.train_size=4", "dataset.test_size=4",
               "dataset.valid_size=0", "dataset.checkpoints=1"]  # no selection without valid prompts


def load(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=list(overrides)))
    validate(cfg)
    return cfg


def assert_nothing_created(root: Path) -> None:
    """No run directory, no MLflow store: at most Hydra's log folder (written before the app)."""
    made = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert not (root / "runs").exists(), f"run directory created: {made}"
    assert not (root / "mlflow.db").exists(), f"MLflow store created: {made}"
    assert set(made) <= {"hydra"}, f"created under output_root: {made}"


def assert_one_error_line(proc, message: str) -> None:
    assert proc.returncode != 0, proc.log[-3000:]
    assert f"error: {message}" in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "Traceback" not in proc.log, proc.log[-3000:]


def data_root(tmp_path: Path, lines: int = 8) -> Path:
    """A data root (``<root>/gsm8k/{train,test}.jsonl``) with the first lines of the real files."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        with open(DATA / "gsm8k" / f"{split}.jsonl", encoding="utf-8") as fh:
            head = [next(fh) for _ in range(lines)]
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(head), encoding="utf-8")
    return root


def replace_line(path: Path, lineno: int, text: str) -> None:
    """Replace line ``lineno`` (1-based) of a file by ``text``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    path.write_text("".join(lines), encoding="utf-8")


def edit_line(path: Path, lineno: int, edit) -> None:
    """Edit the record on line ``lineno`` (1-based) of a JSONL file in place: ``edit(record)``."""
    rec = json.loads(path.read_text(encoding="utf-8").splitlines()[lineno - 1])
    edit(rec)
    replace_line(path, lineno, json.dumps(rec))


def copy_head(src: Path, dst: Path, lines: int = 6) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as fh:
        dst.write_text("".join(next(fh) for _ in range(lines)), encoding="utf-8")
    return dst


def load_error(name: str, root: Path, split: str, **cfg_values) -> DataError:
    cfg = dataset_config(name, str(root))
    cfg.valid_size = 0
    for key, value in cfg_values.items():
        setattr(cfg, key, value)
    with pytest.raises(DataError) as info:
        build_task(cfg).load_split(split)
    return info.value


# ------------------------------------------------ 1. a record without a required field


@needs_data
@pytest.mark.parametrize("split, lineno, field", [("test", 3, "answer"), ("train", 5, "question")])
def test_gsm8k_record_without_a_field_names_file_line_and_field(tmp_path, split, lineno, field):
    root = data_root(tmp_path)
    path = root / "gsm8k" / f"{split}.jsonl"
    edit_line(path, lineno, lambda rec: rec.pop(field))
    err = load_error("gsm8k", root, split)
    assert str(err) == f"{path}:{lineno}: record has no '{field}' field"
    assert isinstance(err, ValueError) and isinstance(err, ConfigError)


@needs_data
@pytest.mark.parametrize("field", ["solution", "problem"])
def test_math_record_without_a_field(tmp_path, field):
    path = copy_head(DATA / "math" / "test.jsonl", tmp_path / "math" / "test.jsonl")
    edit_line(path, 4, lambda rec: rec.pop(field))
    err = load_error("math", tmp_path, "test", num_shots=0)
    assert str(err) == f"{path}:4: record has no '{field}' field"


@needs_data
@pytest.mark.parametrize("edit, field", [
    (lambda rec: rec.pop("answerKey"), "answerKey"),
    (lambda rec: rec["question"].pop("choices"), "choices"),  # nested in the original files
    (lambda rec: rec["question"]["choices"][1].pop("label"), "label"),
])
def test_arc_record_without_a_field(tmp_path, edit, field):
    path = copy_head(DATA / "arc_challenge" / "ARC-Challenge-Test.jsonl",
                     tmp_path / "arc_challenge" / "ARC-Challenge-Test.jsonl")
    edit_line(path, 2, edit)
    err = load_error("arc_challenge", tmp_path, "test")
    assert str(err) == f"{path}:2: record has no '{field}' field"


@needs_data
def test_null_field_and_unparsable_gold_name_the_line(tmp_path):
    root = data_root(tmp_path)
    path = root / "gsm8k" / "test.jsonl"
    edit_line(path, 2, lambda rec: rec.update(question=None))
    assert str(load_error("gsm8k", root, "test")) == f"{path}:2: record's 'question' field is null"
    edit_line(path, 2, lambda rec: rec.update(question="q", answer="forty-two"))
    err = load_error("gsm8k", root, "test")
    assert str(err).startswith(f"{path}:2: no '#### <number>' line in GSM8K solution")


@needs_data
def test_malformed_json_line_keeps_its_message(tmp_path):
    root = data_root(tmp_path)
    path = root / "gsm8k" / "train.jsonl"
    replace_line(path, 6, '{"question": "cut short')
    err = load_error("gsm8k", root, "train")
    assert str(err).startswith(f"{path}:6: malformed JSON line (")
    assert "\n" not in str(err)


def test_hub_rows_are_named_too(monkeypatch):
    """Rows of the hub copy have no file: the message names the hub dataset, split and row."""

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config=None, split=None):
            return [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
                    {"question": "No answer?"}]

    monkeypatch.delenv("IRPO_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    cfg = dataset_config("gsm8k", None)
    cfg.valid_size = 0
    with pytest.raises(DataError) as info:
        build_task(cfg).load_split("test")
    assert str(info.value) == ("hub openai/gsm8k config=main split=test, row 1: "
                               "record has no 'answer' field")


def test_record_keeps_dict_behaviour():
    rec = Record({"a": 1, "b": None}, "f.jsonl:3")
    assert rec["a"] == 1 and rec.get("b") is None and rec.get("c", 5) == 5
    assert dict(rec) == {"a": 1, "b": None} and isinstance(rec, dict)
    with pytest.raises(DataError, match=r"^f\.jsonl:3: record has no 'c' field$"):
        rec["c"]


# ------------------------------------------------------------- 2. data in no place


def test_missing_data_dir_is_one_line_naming_the_field_and_path():
    cfg = dataset_config("gsm8k", "/nonexistent")
    with pytest.raises(DataNotFoundError) as info:
        build_task(cfg).load_split("train")
    message = str(info.value)
    assert message.startswith("dataset.data_dir='/nonexistent' holds no gsm8k train data; "
                              "tried: /nonexistent (not a directory).")
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)


def test_data_dir_without_the_task_files_lists_what_was_tried(tmp_path):
    cfg = dataset_config("gsm8k", str(tmp_path))  # a directory, but empty
    with pytest.raises(DataNotFoundError) as info:
        build_task(cfg).load_split("test")
    message = str(info.value)
    assert message.startswith(
        f"dataset.data_dir={str(tmp_path)!r} holds no gsm8k test data; tried: ")
    assert f"{tmp_path}/gsm8k/test.jsonl" in message and "\n" not in message


# ------------------------------------------------ 3. too few samples for a pairs method


@pytest.mark.parametrize("method", ["rpo", "dpo"])
def test_one_sample_per_prompt_is_refused_for_pairs_methods(method):
    with pytest.raises(ConfigError) as info:
        load(f"method={method}", "samples_per_prompt=1")
    assert str(info.value) == (f"samples_per_prompt=1: method={method} builds (winner, loser) "
                               "pairs from each prompt's samples and needs at least 2")


@pytest.mark.parametrize("overrides", [
    ("method=star", "samples_per_prompt=1"),  # data=correct: one sample can be a winner
    ("method=sft", "samples_per_prompt=1"),
    ("method=rpo_2x", "samples_per_prompt=1"),  # data_multiplier=2: two samples per prompt
    ("method=rpo", "samples_per_prompt=2"),
    ("method=star", "samples_per_prompt=1", "temperature=[0.0]"),  # greedy: one sample
])
def test_enough_samples_are_accepted(overrides):
    load(*overrides)


def test_greedy_decoding_with_several_samples_is_refused():
    with pytest.raises(ConfigError) as info:
        load("samples_per_prompt=4", "temperature=[1.0,0.0]", "iterations=2")
    assert str(info.value) == ("temperature=[1.0, 0.0]: 0 is greedy decoding, one sample per "
                               "prompt, but samples_per_prompt=4 asks for more")
    load("samples_per_prompt=4", "temperature=[1.0,0.0]", "iterations=1")  # 0 never used


def test_unknown_loss_names_the_field_and_the_known_losses():
    with pytest.raises(ConfigError) as info:
        load("method.loss=hinge", "samples_per_prompt=1")  # also a pairs-method error: not shown
    assert str(info.value) == "method.loss='hinge' is not a known loss; known: ipo, none, sigmoid"


# --------------------------------------------------- 4. option lists and type checks


@pytest.mark.parametrize("group", ["dataset", "method", "model", "sampler", "trainer", "eval",
                                   "tracking"])
def test_unknown_option_lists_only_real_options(group):
    with pytest.raises(MissingConfigException) as info:
        load(f"{group}=nosuch")
    assert sorted(info.value.options) == sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert "schema" not in str(info.value).split("Config search path")[0]


@pytest.mark.parametrize("overrides, key", [
    (("betaa=0.1",), "betaa"),
    (("dataset.train_sizee=3",), "train_sizee"),
    (("dataset=gsm8k", "dataset.num_shotz=1"), "num_shotz"),
    (("sampler.batch_size=abc",), "sampler.batch_size"),
    (("sampler=vllm", "sampler.nodes=abc"), "sampler.nodes"),
    (("trainer=deepspeed", "trainer.zero_stage=x"), "trainer.zero_stage"),
    (("method.dataa=x",), "dataa"),
    (("model.lrr=1",), "lrr"),
    (("eval.maj_kk=2",), "maj_kk"),
    (("tracking.backendd=x",), "backendd"),
    (("+dataset@heldout.math=math", "heldout.math.num_shots=abc"), "heldout.math.num_shots"),
])
def test_schemas_still_type_check_every_group(overrides, key):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        load(*overrides)
    assert key in str(info.value) + str(info.value.__cause__)


def test_dataset_nosuch_on_the_command_line(tmp_path):
    proc = run_main(["dataset=nosuch"], tmp_path, check=False)
    assert proc.returncode != 0
    listed = proc.stderr.split("Available options in 'dataset':\n")[1]
    listed = listed.split("Config search path")[0]
    assert listed.split() == ["arc_challenge", "arith", "gsm8k", "math"]
    assert_nothing_created(tmp_path)


@pytest.mark.parametrize("extra", [[], ["experiment=paper_gsm8k_70b"]])
def test_cfg_job_still_composes(tmp_path, extra):
    proc = run_main(["--cfg=job", *extra], tmp_path, check=True)
    assert "dataset:" in proc.stdout and "method:" in proc.stdout and "_schema" not in proc.stdout


# ------------------------------------------- 5. end to end: one line, nothing created


def test_e2e_missing_data_dir(tmp_path):
    out = tmp_path / "out"
    proc = run_main(FAST + GSM8K_SMALL + ["dataset.data_dir=/nonexistent"], out, check=False)
    assert_one_error_line(
        proc, "dataset.data_dir='/nonexistent' holds no gsm8k train data; tried: /nonexistent "
        "(not a directory). Point dataset.data_dir at a data root with one folder per task "
        "(<dir>/gsm8k/train.jsonl) or at the gsm8k folder.")
    assert_nothing_created(out)


@needs_data
def test_e2e_malformed_data_file(tmp_path):
    root, out = data_root(tmp_path), tmp_path / "out"
    path = root / "gsm8k" / "train.jsonl"
    replace_line(path, 2, '{"question": "cut short')
    proc = run_main(FAST + GSM8K_SMALL + [f"dataset.data_dir={root}"], out, check=False)
    assert proc.returncode != 0
    assert f"error: {path}:2: malformed JSON line (" in proc.stderr, proc.log[-3000:]
    assert "Traceback" not in proc.log
    assert_nothing_created(out)


@needs_data
def test_e2e_record_missing_a_field(tmp_path):
    """The test split is read before anything is created too, not only the train split."""
    root, out = data_root(tmp_path), tmp_path / "out"
    path = root / "gsm8k" / "test.jsonl"
    edit_line(path, 3, lambda rec: rec.pop("answer"))
    proc = run_main(FAST + GSM8K_SMALL + [f"dataset.data_dir={root}"], out, check=False)
    assert_one_error_line(proc, f"{path}:3: record has no 'answer' field")
    assert_nothing_created(out)


def test_e2e_empty_model_path(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    proc = run_main(FAST + ["model.builtin=null", f"model.path={empty}"], out, check=False)
    assert_one_error_line(proc, f"model.path={empty}: no Hugging Face checkpoint there "
                                "(config.json missing); point it at a save_pretrained directory")
    assert_nothing_created(out)


def test_e2e_unknown_loss(tmp_path):
    proc = run_main(FAST + ["method.loss=hinge"], tmp_path, check=False)
    assert_one_error_line(proc, "method.loss='hinge' is not a known loss; known: ipo, none, sigmoid")
    assert_nothing_created(tmp_path)


def test_e2e_one_sample_per_prompt(tmp_path):
    proc = run_main(FAST + ["samples_per_prompt=1", "dataset.add_gold_to_winners=false"],
                    tmp_path, check=False)
    assert_one_error_line(proc, "samples_per_prompt=1: method=rpo builds (winner, loser) pairs "
                                "from each prompt's samples and needs at least 2")
    assert_nothing_created(tmp_path)
