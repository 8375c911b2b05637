"""The built-in model's reproducible build: the same bits at any thread count, the
record beside the weights (checksum, accuracy), and a corrupted cache built again."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irpo.builtin_build import measure_accuracy
from irpo.builtin_model import ensure_builtin_model, pretrain_data_config
from irpo.builtin_record import RECORD, read_record, verify, weights_checksum
from irpo.config import ArithConfig, ModelConfig

# A reduced build: the default width (so that its GEMMs are big enough for oneMKL to
# split them over threads, which is what changes the bits without strict CNR mode),
# two layers, a few steps.
SMALL = ModelConfig(
    name="tiny", builtin="tiny", hidden_size=128, num_heads=4, num_layers=2, intermediate_size=512,
    vocab_size=320, max_position_embeddings=512, pretrain_steps=12, pretrain_batch_size=32,
    pretrain_eval_size=8, pretrain_lr=3e-3, pretrain_seed=0,
)
DATA = ArithConfig(pretrain_size=400, train_size=8, valid_size=8, test_size=8)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[int, Path]:
    """The same config built at 1 and at 2 threads, each in its own cache."""
    paths, before = {}, os.environ.get("OMP_NUM_THREADS")
    try:
        for threads in (1, 2):
            os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the build's child process
            paths[threads] = ensure_builtin_model(SMALL, DATA, tmp_path_factory.mktemp(f"t{threads}"))
    finally:
        os.environ.pop("OMP_NUM_THREADS") if before is None else os.environ.update(OMP_NUM_THREADS=before)
    return paths


def test_same_bits_at_1_and_2_threads(builds):
    one, two = read_record(builds[1]), read_record(builds[2])
    assert (one["threads"], two["threads"]) == (1, 2)  # each build really ran at its count
    a, b = load_file(builds[1] / "model.safetensors"), load_file(builds[2] / "model.safetensors")
    assert sorted(a) == sorted(b) and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert one["final_loss"] == two["final_loss"] < 5.0  # it trained (ln 320 = 5.8)
    assert (builds[1] / "tokenizer.json").read_bytes() == (builds[2] / "tokenizer.json").read_bytes()
    assert one["sha256"] == two["sha256"]


def test_checksum_follows_its_documented_definition(builds):
    # sha256 over name|dtype|shape| and the raw bytes of every tensor, in name order.
    tensors = load_file(builds[1] / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(bytes(t.contiguous().view(torch.uint8).flatten().tolist()))
    assert read_record(builds[1])["sha256"] == digest.hexdigest() == weights_checksum(builds[1])


def test_checksum_sees_one_changed_weight(builds, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(builds[1] / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] += 1e-6
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert weights_checksum(tmp_path) != weights_checksum(builds[1])


def test_load_logs_checksum_and_accuracy(builds, caplog):
    record = read_record(builds[1])
    assert record["eval_size"] == 8 and 0.0 <= record["test_accuracy"] <= 1.0
    with caplog.at_level(logging.INFO, logger="irpo.builtin_model"):
        assert ensure_builtin_model(SMALL, DATA, builds[1].parent.parent) == builds[1]
    line = next(r.getMessage() for r in caplog.records if "using the cached built-in model" in r.getMessage())
    assert record["sha256"][:16] in line
    assert f"greedy test accuracy {record['test_accuracy']:.1%} on the first 8 arith test problems" in line


def test_corrupted_weights_are_built_again(builds, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(builds[1].parent.parent, cache)
    path = cache / "models" / builds[1].name
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
    rebuilt, original = load_file(weights), load_file(builds[1] / "model.safetensors")
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)  # the same model, rebuilt


def test_a_missing_record_is_not_trusted(builds, tmp_path):
    shutil.copytree(builds[1], tmp_path / "m")
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
