"""The built-in model's reproducible build: the same bits whatever the caller's thread
count and whichever kernels oneMKL or OpenBLAS would pick, the record beside the weights
(checksum, accuracy), and a corrupted cache built again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irpo.builtin_build import measure_accuracy
from irpo.builtin_model import ensure_builtin_model, pretrain_data_config
from irpo.builtin_record import (
    BUILD_THREADS,
    RECORD,
    REPRODUCIBLE_ENV,
    RUN_PIN,
    pin_run_to_model,
    read_record,
    verify,
    weights_checksum,
)
from irpo.config import ModelConfig
from irpo.tasks.arith import ArithConfig

# A reduced build: the default width (so that its GEMMs are big enough for oneMKL to
# split them over threads and pick blocked kernels, which is what changes the bits),
# two layers, a few steps.
SMALL = ModelConfig(
    name="tiny", builtin="tiny", hidden_size=128, num_heads=4, num_layers=2, intermediate_size=512,
    vocab_size=320, max_position_embeddings=512, pretrain_steps=12, pretrain_batch_size=32,
    pretrain_eval_size=8, pretrain_lr=3e-3, pretrain_seed=0,
)
DATA = ArithConfig(pretrain_size=400, train_size=8, valid_size=8, test_size=8)
# The caller's environment of each build: its thread count, and the kernels oneMKL and
# OpenBLAS would choose on another CPU: oneMKL restricted to an instruction set
# (MKL_ENABLE_INSTRUCTIONS, as on an older Intel CPU or an AMD one) and OpenBLAS told
# another core (OPENBLAS_CORETYPE, as its own detection would on that CPU).
ANOTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OPENBLAS_CORETYPE": "Sandybridge"}
CALLERS = {
    "1 thread": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    "3 threads": {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"},
    "another CPU": {"OMP_NUM_THREADS": "2", **ANOTHER_CPU},
}
FIRST = "1 thread"  # the build the other tests use


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """The same config built from each caller environment, each in its own cache."""
    paths = {}
    for label, env in CALLERS.items():
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)  # read by the build's child process
            paths[label] = ensure_builtin_model(SMALL, DATA, tmp_path_factory.mktemp("cache"))
    return paths


def test_same_bits_whatever_the_caller_threads_and_isa(builds):
    records = {label: read_record(builds[label]) for label in CALLERS}
    assert {r["threads"] for r in records.values()} == {BUILD_THREADS}  # the build pins its own
    first = load_file(builds["1 thread"] / "model.safetensors")
    assert len(first) > 10
    for label in CALLERS:
        other = load_file(builds[label] / "model.safetensors")
        assert sorted(other) == sorted(first)
        assert [k for k in first if not torch.equal(first[k], other[k])] == [], label
        assert records[label]["sha256"] == records["1 thread"]["sha256"], label
        assert (builds[label] / "tokenizer.json").read_bytes() == (builds["1 thread"] / "tokenizer.json").read_bytes()
    assert records["1 thread"]["final_loss"] < 5.0  # it trained (ln 320 = 5.8)


def _build(out: Path, **env: str | None) -> str:
    """SMALL built with REPRODUCIBLE_ENV changed by ``env`` (None: unset); its weights' sha256."""
    spec = json.dumps({"model": dataclasses.asdict(SMALL), "data": dataclasses.asdict(DATA), "out": str(out)})
    child_env = {**os.environ, **REPRODUCIBLE_ENV, **env}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    subprocess.run([sys.executable, "-m", "irpo.builtin_build", spec], env=child_env, check=True,
                   capture_output=True)
    return read_record(out)["sha256"]


def test_a_job_given_one_cpu_builds_the_same_bits(tmp_path):
    """OpenBLAS caps OPENBLAS_NUM_THREADS at the CPUs a process may run on (a SLURM job
    with --cpus-per-task=1); the build sets its thread count itself, so the split is the
    same. Three steps: enough for the products to differ if it were not (measured: 12 steps
    under `taskset -c 0` gave another sha256 before the build set it)."""
    few = {"model": {**dataclasses.asdict(SMALL), "pretrain_steps": 3, "pretrain_eval_size": 0},
           "data": dataclasses.asdict(DATA)}
    shas = []
    for label, cpus in (("two", None), ("one", {min(os.sched_getaffinity(0))})):
        out = tmp_path / label
        spec = json.dumps({**few, "out": str(out)})
        subprocess.run([sys.executable, "-m", "irpo.builtin_build", spec], env={**os.environ, **REPRODUCIBLE_ENV},
                       check=True, capture_output=True,
                       preexec_fn=None if cpus is None else lambda cpus=cpus: os.sched_setaffinity(0, cpus))
        shas.append(read_record(out)["sha256"])
    assert shas[0] == shas[1]


def test_the_cpu_switches_really_change_default_kernels(builds, tmp_path):
    """The control for the test above: without the pins, the other CPU's kernels give other
    weights, so the equality above is the pins' doing. oneMKL: without MKL_CBWR=COMPATIBLE,
    its SSE4.2 kernels round otherwise than its default ones; OpenBLAS: its Sandybridge
    kernels (AVX, no FMA) otherwise than the Haswell ones the build names."""
    pinned = read_record(builds[FIRST])["sha256"]  # built with the pins as they are
    assert _build(tmp_path / "sandybridge", OPENBLAS_CORETYPE="Sandybridge") != pinned
    default = _build(tmp_path / "default", MKL_CBWR=None)
    assert _build(tmp_path / "sse", MKL_CBWR=None, MKL_ENABLE_INSTRUCTIONS="SSE4_2") != default


def test_checksum_follows_its_documented_definition(builds):
    # sha256 over name|dtype|shape| and the raw bytes of every tensor, in name order.
    tensors = load_file(builds[FIRST] / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(bytes(t.contiguous().view(torch.uint8).flatten().tolist()))
    assert read_record(builds[FIRST])["sha256"] == digest.hexdigest() == weights_checksum(builds[FIRST])


def test_checksum_sees_one_changed_weight(builds, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(builds[FIRST] / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] += 1e-6
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert weights_checksum(tmp_path) != weights_checksum(builds[FIRST])


def test_load_logs_checksum_and_accuracy(builds, caplog):
    record = read_record(builds[FIRST])
    assert record["eval_size"] == 8 and 0.0 <= record["test_accuracy"] <= 1.0
    with caplog.at_level(logging.INFO, logger="irpo.builtin_model"):
        assert ensure_builtin_model(SMALL, DATA, builds[FIRST].parent.parent) == builds[FIRST]
    line = next(r.getMessage() for r in caplog.records if "using the cached built-in model" in r.getMessage())
    assert record["sha256"][:16] in line
    assert f"greedy test accuracy {record['test_accuracy']:.1%} on the first 8 arith test problems" in line


def test_corrupted_weights_are_built_again(builds, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(builds[FIRST].parent.parent, cache)
    path = cache / "models" / builds[FIRST].name
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF  # a byte of the last tensor's data, not of the header
    weights.write_bytes(bytes(raw))
    ok, why = verify(path)
    assert not ok and "sha256" in why
    with caplog.at_level(logging.WARNING, logger="irpo.builtin_model"):
        assert ensure_builtin_model(SMALL, DATA, cache) == path
    assert any("does not match its record" in r.getMessage() for r in caplog.records)
    assert verify(path) == (True, "")
    rebuilt, original = load_file(weights), load_file(builds[FIRST] / "model.safetensors")
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)  # the same model, rebuilt


def test_a_missing_record_is_not_trusted(builds, tmp_path):
    shutil.copytree(builds[FIRST], tmp_path / "m")
    (tmp_path / "m" / RECORD).unlink()
    assert verify(tmp_path / "m") == (False, f"no readable {RECORD} with a sha256")


def test_eval_size_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="model.pretrain_eval_size=-1"):
        ensure_builtin_model(dataclasses.replace(SMALL, pretrain_eval_size=-1), DATA, tmp_path)


@pytest.mark.slow
def test_recorded_accuracy_is_the_greedy_accuracy(tmp_path):
    """The default M0 (cached for the end-to-end tests): its accuracy measured as the run
    measures it agrees with greedy decoding written here, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irpo.config import compose, to_config
    from irpo.tasks.arith import ArithTask

    model_cfg = to_config(compose(["model=tiny"])).model  # as a run with model=tiny composes it
    path = ensure_builtin_model(model_cfg, ArithConfig(), os.environ["IRPO_CACHE_DIR"])
    n, data = 40, pretrain_data_config(None)  # the default arithmetic task, other splits empty
    task = ArithTask(dataclasses.replace(data, test_size=n))
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    right = 0
    for ex in task.load_split("test"):
        ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=96, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        right += task.is_correct(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ex.gold_answer)
    measured = measure_accuracy(path, data, n)
    assert 0.1 < measured < 0.9  # a model that answers some and misses some: the check means something
    # Batched (left-padded) and one-at-a-time decoding may break a near-tie differently.
    assert abs(measured * n - right) <= 1
    assert read_record(path)["eval_size"] == 1000


def test_a_run_directory_keeps_the_m0_it_started_from(builds, tmp_path):
    run = tmp_path / "run"
    (run / "iter0" / "eval").mkdir(parents=True)
    pin_run_to_model(run, builds[FIRST])  # a new run: its M0 is recorded before any stage
    sha = read_record(builds[FIRST])["sha256"]
    assert json.loads((run / RUN_PIN).read_text())["sha256"] == sha
    (run / "iter0" / "eval" / "DONE").write_text("{}")
    pin_run_to_model(run, builds[FIRST])  # resumed with the same M0: fine
    other = tmp_path / "other-m0"
    shutil.copytree(builds[FIRST], other)
    record = read_record(other)
    record["sha256"] = "ab" * 32  # what another irpo build of M0 records
    (other / RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"started from the built-in model with sha256 {sha[:16]}, "
                                         f"but this irpo builds M0 as sha256 {'ab' * 8}"):
        pin_run_to_model(run, other)


def test_a_run_directory_from_before_the_pin_is_refused(builds, tmp_path):
    (tmp_path / "run" / "iter0" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "iter0" / "eval" / "DONE").write_text("{}")
    with pytest.raises(ValueError, match="has finished stages but no m0.json"):
        pin_run_to_model(tmp_path / "run", builds[FIRST])
    assert not (tmp_path / "run" / RUN_PIN).exists()
    outside = tmp_path / "hub-checkpoint"  # model.path: no record, not pinned
    outside.mkdir()
    pin_run_to_model(tmp_path / "run", outside)
    assert not (tmp_path / "run" / RUN_PIN).exists()
