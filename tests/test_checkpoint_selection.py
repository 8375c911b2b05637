"""Checkpoint selection on held-out training prompts (the paper's procedure).

With ``trainer.checkpoints`` > 1 the train stage saves several checkpoints and keeps the one
with the best greedy accuracy on the valid split. The real datasets turn it on
(``dataset.checkpoints``); the embedded default keeps one checkpoint, so it stays as fast.
The selection runs the driver's own train stage, the real evaluation and the arith checker
on a real valid split; only the trainer (which writes three marked checkpoints) and the
sampler (which answers a known number of valid prompts right per checkpoint) are scripted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_config import load
from test_trainer import make_cfg

from irpo import driver
from irpo.config import ConfigError
from irpo.rundir import RunDir
from irpo.sampling import Generation
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.tracking import NullTracker


class ScriptedSampler:
    """Greedy answers of one checkpoint: the first ``right`` valid prompts correct, the rest off by one."""

    def __init__(self, gold_of: dict[str, str], order: list[str], right: int):
        self.gold_of, self.order, self.right = gold_of, order, right

    def generate(self, prompts, n, temperature, max_new_tokens, seed, desc="", first_index=0):
        assert n == 1 and temperature == 0.0  # selection is on greedy accuracy
        out = []
        for p in prompts:
            gold = int(self.gold_of[p])
            ok = self.order.index(p) < self.right
            text = f"steps ...\nFinal answer: {gold if ok else gold + 1}"
            out.append([Generation(text=text, num_tokens=5, finished=True)])
        return out

    def close(self):
        pass


def run_selection(tmp_path: Path, monkeypatch, right: dict[str, int]) -> tuple[dict, Path]:
    task = ArithTask(ArithConfig(train_size=4, valid_size=8, test_size=4))
    valid = task.load_split("valid")
    gold_of = {e.prompt: e.gold_answer for e in valid}
    order = [e.prompt for e in valid]
    assert len(set(order)) == 8  # distinct prompts, so the script is unambiguous

    def fake_train(cfg, init, examples, out_dir, log, offset, seed):
        for name in right:
            (out_dir / name).mkdir()
            (out_dir / name / "marker").write_text(name)
        return {"checkpoints": list(right), "steps": 6}

    monkeypatch.setattr(driver, "get_trainer", lambda name: fake_train)
    monkeypatch.setattr(driver, "build_sampler",
                        lambda scfg, path, dtype: ScriptedSampler(gold_of, order, right[Path(path).name]))
    (tmp_path / "iter1/data").mkdir(parents=True)
    (tmp_path / "iter1/data/train.jsonl").write_text('{"id": "0"}\n')
    cfg = make_cfg(checkpoints=len(right))
    cfg = dataclasses.replace(cfg, dataset=ArithConfig(train_size=4, valid_size=8, test_size=4))
    ctx = driver.Context(cfg, task, RunDir(tmp_path), NullTracker(), {"valid": valid})
    out = tmp_path / "iter1/train.tmp"
    out.mkdir(parents=True)
    return driver.stage_train(ctx, 1, tmp_path / "m0", out), out


def test_the_best_checkpoint_on_the_valid_split_is_kept(tmp_path, monkeypatch):
    info, out = run_selection(tmp_path, monkeypatch, {"ckpt-2": 3, "ckpt-4": 7, "ckpt-6": 5})
    assert info["valid_scores"] == {"ckpt-2": 3 / 8, "ckpt-4": 7 / 8, "ckpt-6": 5 / 8}
    assert info["selected"] == "ckpt-4"
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # the others are removed
    assert (out / "model" / "marker").read_text() == "ckpt-4"


def test_equal_scores_keep_the_earliest_checkpoint(tmp_path, monkeypatch):
    info, out = run_selection(tmp_path, monkeypatch, {"ckpt-2": 2, "ckpt-4": 6, "ckpt-6": 6})
    assert info["selected"] == "ckpt-4" and (out / "model" / "marker").read_text() == "ckpt-4"


@pytest.mark.parametrize("dataset, want", [("arith", 1), ("gsm8k", 4), ("math", 4),
                                           ("arc_challenge", 4)])
@pytest.mark.parametrize("trainer", ["torch", "deepspeed"])
def test_real_datasets_select_checkpoints_and_the_default_does_not(dataset, want, trainer):
    cfg = load(f"dataset={dataset}", f"trainer={trainer}")
    assert cfg.trainer.checkpoints == want
    assert want == 1 or cfg.dataset.valid_size >= 300  # held-out prompts to select on
    assert load(f"dataset={dataset}", f"trainer={trainer}", "trainer.checkpoints=2").trainer.checkpoints == 2


def test_selection_without_held_out_prompts_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer.checkpoints=4 .* dataset.valid_size=0"):
        load("dataset=gsm8k", "dataset.valid_size=0")
