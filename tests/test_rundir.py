"""Run directories and stages: hashing, atomic hand-off, skipping finished stages."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from irpo.rundir import RunDir, config_hash, read_jsonl, write_jsonl


def test_hash_ignores_where_things_are_stored_but_not_what_is_computed():
    base = OmegaConf.create({"beta": 0.1, "output_root": "a", "tracking": {"backend": "mlflow"}})
    same = OmegaConf.create({"beta": 0.1, "output_root": "b", "tracking": {"backend": "none"}})
    other = OmegaConf.create({"beta": 0.5, "output_root": "a", "tracking": {"backend": "mlflow"}})
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other)
    # How often training saves step checkpoints may change between attempts of one run.
    ckpt = OmegaConf.create({"beta": 0.1, "trainer": {"lr": 1.0, "save_every_min": 30.0}})
    assert config_hash(ckpt) == config_hash(OmegaConf.create(
        {"beta": 0.1, "trainer": {"lr": 1.0, "save_every_min": 5.0, "save_every_steps": 2}}))
    assert config_hash(ckpt) != config_hash(OmegaConf.create({"beta": 0.1, "trainer": {"lr": 2.0}}))
    assert len(config_hash(base)) == 10


def test_hash_of_a_value_that_interpolates_a_dropped_key():
    """experiment=paper_gsm8k_70b: sampler.shard_dir is ${output_root}/vllm-shards."""
    def cfg(root):
        return OmegaConf.create({"output_root": root, "beta": 0.1,
                                 "sampler": {"nodes": 8, "shard_dir": "${output_root}/vllm-shards"}})

    assert config_hash(cfg("/a")) == config_hash(cfg("/b"))
    assert config_hash(cfg("/a")) != config_hash(OmegaConf.merge(cfg("/a"), {"sampler": {"nodes": 4}}))


def test_stage_runs_once_then_is_skipped(tmp_path):
    run = RunDir(tmp_path)
    calls = []

    def stage(out):
        calls.append(out)
        (out / "artifact.txt").write_text("x")
        return {"value": 3}

    path, info = run.run_stage(1, "sample", stage)
    assert path == tmp_path / "iter1" / "sample" and (path / "artifact.txt").read_text() == "x"
    assert info["value"] == 3 and info["skipped"] is False and info["wall_s"] >= 0
    assert calls[0].name == "sample.tmp"  # written under .tmp, renamed when complete
    assert json.loads((path / "DONE").read_text())["value"] == 3
    _, info = run.run_stage(1, "sample", stage)
    assert info == {**json.loads((path / "DONE").read_text()), "skipped": True}
    assert len(calls) == 1


def test_failed_stage_leaves_no_marker_and_reruns_cleanly(tmp_path):
    run = RunDir(tmp_path)

    def broken(out):
        (out / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.run_stage(1, "train", broken)
    assert run.done_info(1, "train") is None
    assert not (tmp_path / "iter1" / "train").exists()

    def good(out):
        assert not (out / "partial.txt").exists()  # the partial .tmp was discarded
        return {}

    run.run_stage(1, "train", good)
    assert run.done_info(1, "train") is not None


def test_jsonl_round_trip_and_bad_line_is_named(tmp_path):
    f = tmp_path / "x.jsonl"
    write_jsonl(f, [{"a": 1}, {"b": "two"}])
    assert read_jsonl(f) == [{"a": 1}, {"b": "two"}]
    f.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(f)
