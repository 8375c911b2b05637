"""The built-in model: the shipped M0 (a file, checked on every load), a build from any
other config (recorded, cached, rebuilt when damaged), the builder's command, and the pin
a run directory keeps of the M0 it started from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irpo import builtin_model
from irpo.builtin_build import measure_accuracy
from irpo.builtin_model import ensure_builtin_model, pretrain_data_config, shipped_model_dir
from irpo.builtin_record import RECORD, RUN_PIN, pin_run_to_model, read_record, verify, weights_checksum
from irpo.config import ModelConfig, compose, to_config
from irpo.tasks.arith import ArithConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = shipped_model_dir("tiny")
# The shipped M0's weights, pinned: a changed file must be a deliberate change here too.
SHIPPED_SHA256 = "4841bfda3545c07096087f030795f5757028a4994f81862c924770a8ee969501"
# A reduced build: two layers, a few steps, a few test problems.
SMALL = ModelConfig(
    name="tiny", builtin="tiny", hidden_size=128, num_heads=4, num_layers=2, intermediate_size=512,
    vocab_size=320, max_position_embeddings=512, pretrain_steps=12, pretrain_batch_size=32,
    pretrain_eval_size=8, pretrain_lr=3e-3, pretrain_seed=0,
)
DATA = ArithConfig(pretrain_size=400, train_size=8, valid_size=8, test_size=8)


def default_model() -> ModelConfig:
    return to_config(compose(["model=tiny"])).model  # as a run with model=tiny composes it


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """SMALL built into a cache of its own (not the shipped config, so it is built)."""
    return ensure_builtin_model(SMALL, DATA, tmp_path_factory.mktemp("cache"))


def test_model_tiny_is_the_shipped_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="irpo.builtin_model"):
        path = ensure_builtin_model(default_model(), ArithConfig(), tmp_path)
    assert path == SHIPPED == REPO / "irpo" / "assets" / "tiny"
    assert not (tmp_path / "models").exists()  # nothing built
    record = read_record(path)
    assert record["sha256"] == weights_checksum(path) == SHIPPED_SHA256
    assert record["eval_size"] == 1000 and 0.3 < record["test_accuracy"] < 0.8
    assert {"command", "cpu", "threads", "torch", "date"} <= set(record["built"])
    line = next(r.getMessage() for r in caplog.records if "shipped built-in model" in r.getMessage())
    assert SHIPPED_SHA256[:16] in line and "on the first 1000 arith test problems" in line
    # Every task's M0 is the same file: GSM8K runs start from it too.
    gsm8k = to_config(compose(["dataset=gsm8k", "model=tiny"]))
    assert ensure_builtin_model(gsm8k.model, gsm8k.dataset, tmp_path) == SHIPPED


def test_a_damaged_shipped_file_is_one_clear_error(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(SHIPPED, assets / "tiny")
    weights = assets / "tiny" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF  # a byte of the last tensor's data, not of the header
    weights.write_bytes(bytes(raw))
    monkeypatch.setattr(builtin_model, "ASSETS", assets)
    with pytest.raises(RuntimeError, match=r"the shipped built-in model .* does not match its record "
                                           r"\(weights sha256 \w+ != recorded \w+\): the installation is damaged"):
        ensure_builtin_model(default_model(), ArithConfig(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # no silent rebuild


def test_the_package_carries_the_shipped_model(tmp_path):
    """A non-editable install has M0 too: the wheel holds every file of the checkpoint."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("irpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in SHIPPED.iterdir():
        assert f"irpo/assets/tiny/{f.name}" in names


def test_another_config_is_built_recorded_and_cached(small, caplog):
    assert small.parent.name == "models" and small.name.startswith("tiny-")
    record = read_record(small)
    assert record["sha256"] == weights_checksum(small) != SHIPPED_SHA256
    assert record["eval_size"] == 8 and 0.0 <= record["test_accuracy"] <= 1.0
    assert record["final_loss"] < 5.0  # it trained (ln 320 = 5.8)
    with caplog.at_level(logging.INFO, logger="irpo.builtin_model"):
        assert ensure_builtin_model(SMALL, DATA, small.parent.parent) == small
    line = next(r.getMessage() for r in caplog.records if "using the cached built-in model" in r.getMessage())
    assert record["sha256"][:16] in line
    assert f"greedy test accuracy {record['test_accuracy']:.1%} on the first 8 arith test problems" in line


def test_a_build_says_what_differs_and_that_its_bits_are_its_own(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(builtin_model, "_build", lambda m, d, out: (_ for _ in ()).throw(RuntimeError("stop")))
    with caplog.at_level(logging.WARNING, logger="irpo.builtin_model"), pytest.raises(RuntimeError):
        ensure_builtin_model(dataclasses.replace(default_model(), pretrain_steps=400), ArithConfig(), tmp_path)
    line = next(r.getMessage() for r in caplog.records if "differs from the shipped" in r.getMessage())
    assert "model.pretrain_steps=400 instead of 800" in line and "its sha256 is its own" in line


def test_same_config_same_machine_same_bits(small, tmp_path):
    """Built twice here at the same thread count: the same weights (the build is seeded)."""
    again = ensure_builtin_model(SMALL, DATA, tmp_path)
    assert read_record(again)["sha256"] == read_record(small)["sha256"]


def test_the_builder_command(tmp_path):
    out = tmp_path / "m0"
    proc = subprocess.run(
        [sys.executable, "-m", "irpo.builtin_build", "--out", str(out), "model.num_layers=2",
         "model.pretrain_steps=3", "model.pretrain_eval_size=4", "dataset.pretrain_size=200"],
        capture_output=True, text=True, check=True)
    record = read_record(out)
    assert record["sha256"] == weights_checksum(out)
    assert record["build_key"]["model"]["pretrain_steps"] == 3
    assert record["build_key"]["data"]["pretrain_size"] == 200
    assert record["built"]["command"].endswith("model.pretrain_steps=3 model.pretrain_eval_size=4 "
                                               "dataset.pretrain_size=200")
    assert f"{out}: sha256 {record['sha256'][:16]}" in proc.stderr
    assert "its bits may differ" in proc.stderr
    assert not list(tmp_path.glob("*.tmp-*"))


def test_checksum_follows_its_documented_definition():
    # sha256 over name|dtype|shape| and the raw bytes of every tensor, in name order.
    tensors = load_file(SHIPPED / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(bytes(t.contiguous().view(torch.uint8).flatten().tolist()))
    assert digest.hexdigest() == weights_checksum(SHIPPED) == SHIPPED_SHA256


def test_checksum_sees_one_changed_weight(tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(SHIPPED / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] += 1e-6
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert weights_checksum(tmp_path) != SHIPPED_SHA256


def test_a_damaged_cached_build_is_built_again(small, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(small.parent.parent, cache)
    path = cache / "models" / small.name
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    ok, why = verify(path)
    assert not ok and "sha256" in why
    with caplog.at_level(logging.WARNING, logger="irpo.builtin_model"):
        assert ensure_builtin_model(SMALL, DATA, cache) == path
    assert any("does not match its record" in r.getMessage() for r in caplog.records)
    assert verify(path) == (True, "")


def test_a_missing_record_is_not_trusted(tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "m")
    (tmp_path / "m" / RECORD).unlink()
    assert verify(tmp_path / "m") == (False, f"no readable {RECORD} with a sha256")


def test_eval_size_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="model.pretrain_eval_size=-1"):
        ensure_builtin_model(dataclasses.replace(SMALL, pretrain_eval_size=-1), DATA, tmp_path)


def test_recorded_accuracy_is_the_greedy_accuracy():
    """The shipped M0: its accuracy measured as the run measures it agrees with greedy
    decoding written here with plain ``generate``, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irpo.tasks.arith import ArithTask

    n, data = 40, pretrain_data_config(None)  # the default arithmetic task, other splits empty
    task = ArithTask(dataclasses.replace(data, test_size=n))
    model, tok = AutoModelForCausalLM.from_pretrained(SHIPPED), AutoTokenizer.from_pretrained(SHIPPED)
    right = 0
    for ex in task.load_split("test"):
        ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=96, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        right += task.is_correct(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ex.gold_answer)
    measured = measure_accuracy(SHIPPED, data, n)
    assert 0.1 < measured < 0.9  # a model that answers some and misses some: the check means something
    # Batched (left-padded) and one-at-a-time decoding may break a near-tie differently.
    assert abs(measured * n - right) <= 1


@pytest.mark.slow
def test_the_recorded_accuracy_is_measured_on_the_default_test_split():
    record = read_record(SHIPPED)
    assert measure_accuracy(SHIPPED, pretrain_data_config(None), 1000) == record["test_accuracy"]


def test_a_run_directory_keeps_the_m0_it_started_from(tmp_path):
    run = tmp_path / "run"
    (run / "iter0" / "eval").mkdir(parents=True)
    pin_run_to_model(run, SHIPPED)  # a new run: its M0 is recorded before any stage
    assert json.loads((run / RUN_PIN).read_text())["sha256"] == SHIPPED_SHA256
    (run / "iter0" / "eval" / "DONE").write_text("{}")
    pin_run_to_model(run, SHIPPED)  # resumed with the same M0: fine
    other = tmp_path / "other-m0"
    shutil.copytree(SHIPPED, other)
    record = read_record(other)
    record["sha256"] = "ab" * 32  # what another irpo's M0 records
    (other / RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"started from the built-in model with sha256 {SHIPPED_SHA256[:16]}, "
                                         f"but this irpo's M0 is sha256 {'ab' * 8}"):
        pin_run_to_model(run, other)


def test_a_run_directory_from_before_the_pin_is_refused(tmp_path):
    (tmp_path / "run" / "iter0" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "iter0" / "eval" / "DONE").write_text("{}")
    with pytest.raises(ValueError, match="has finished stages but no m0.json"):
        pin_run_to_model(tmp_path / "run", SHIPPED)
    assert not (tmp_path / "run" / RUN_PIN).exists()
    outside = tmp_path / "hub-checkpoint"  # model.path: no record, not pinned
    outside.mkdir()
    pin_run_to_model(tmp_path / "run", outside)
    assert not (tmp_path / "run" / RUN_PIN).exists()
