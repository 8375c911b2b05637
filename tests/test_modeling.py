"""Checkpoint loading, the tokenisation convention, and the built-in model's build and cache."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from irpo import builtin_model
from irpo.builtin_model import (
    builtin_model_dir,
    check_architecture,
    ensure_builtin_model,
    lr_factor,
)
from irpo.builtin_record import weights_checksum
from irpo.config import ModelConfig
from irpo.modeling import (
    encode_prompt,
    encode_response,
    format_prompt,
    load_model,
    resolve_device,
    resolve_dtype,
)
from irpo.tasks.arith import ArithConfig
from irpo.tasks.common import HubTaskConfig

# Small enough to build in a few seconds; the same values in test_sampling.py
# hit the same cache directory within a session.
TINY = ModelConfig(
    name="tiny", builtin="tiny", hidden_size=64, num_heads=2, num_layers=2, intermediate_size=128,
    vocab_size=320, max_position_embeddings=512, pretrain_steps=20, pretrain_batch_size=8,
    pretrain_eval_size=16, pretrain_lr=3e-3, pretrain_seed=0,
)
DATA = ArithConfig(pretrain_size=200, train_size=8, valid_size=8, test_size=8)
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "irpo-cache"
    return ensure_builtin_model(TINY, DATA, cache), cache


def test_checkpoint_files_and_loading(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, cache = built
    assert path.parent == cache / "models" and path.name.startswith("tiny-")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(".tmp-" in p.name for p in path.parent.iterdir())  # no leftover build dir
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.max_position_embeddings == 512
    assert model.config.vocab_size == len(tok) <= 320
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template is None
    info = json.loads((path / "irpo_builtin.json").read_text())
    assert info["build_key"]["model"]["pretrain_steps"] == 20
    assert info["final_loss"] < 6.0  # below ln(320) = 5.8 + slack: it did train


def test_cache_is_reused(built):
    path, cache = built
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_model(TINY, DATA, cache) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_cache_key():
    here = builtin_model_dir(TINY, DATA, "c")
    # Split sizes other than pretrain do not change the pre-training data.
    assert builtin_model_dir(TINY, dataclasses.replace(DATA, train_size=99), "c") == here
    assert builtin_model_dir(dataclasses.replace(TINY, dtype="bfloat16"), DATA, "c") == here
    assert builtin_model_dir(dataclasses.replace(TINY, lr=1e-3, name="x"), DATA, "c") == here
    assert builtin_model_dir(dataclasses.replace(TINY, pretrain_seed=1), DATA, "c") != here
    assert builtin_model_dir(TINY, dataclasses.replace(DATA, max_value=500), "c") != here
    # Any non-arith dataset: pre-trained on the default arithmetic data.
    gsm = HubTaskConfig(name="gsm8k")
    assert builtin_model_dir(TINY, gsm, "c") == builtin_model_dir(TINY, ArithConfig(), "c") != here


def test_concurrent_builds_build_once(tmp_path, monkeypatch):
    calls = []

    def fake_build(model_cfg, data_cfg, out):
        from safetensors.torch import save_file

        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, out / "model.safetensors")
        record = {"sha256": weights_checksum(out), "test_accuracy": 0.5, "eval_size": 2}
        (out / "irpo_builtin.json").write_text(json.dumps(record))

    monkeypatch.setattr(builtin_model, "_build", fake_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_builtin_model(TINY, DATA, tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").exists()


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(model_cfg, data_cfg, out):
        out.mkdir(parents=True)
        raise RuntimeError("boom")

    monkeypatch.setattr(builtin_model, "_build", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_builtin_model(TINY, DATA, tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_head_dim_must_be_at_least_32(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        check_architecture(dataclasses.replace(TINY, hidden_size=64, num_heads=4))
    with pytest.raises(ValueError, match="head_dim"):
        ensure_builtin_model(dataclasses.replace(TINY, num_heads=4), DATA, tmp_path)
    with pytest.raises(ValueError, match="divisible"):
        check_architecture(dataclasses.replace(TINY, hidden_size=96, num_heads=5))
    with pytest.raises(ValueError, match="builtin"):
        ensure_builtin_model(dataclasses.replace(TINY, builtin="huge"), DATA, tmp_path)


def _gsm8k_questions(n: int = 50) -> list[str]:
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} not present")
    lines = GSM8K.read_text().splitlines()[:n]
    return [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in lines]


def test_tokenizer_encodes_any_text(built):
    _, tok = load_model(built[0])
    texts = _gsm8k_questions() + ["café – π ≈ 3.14159 😀 \t tabs\nand 中文", "(A) 42 (B) $\\frac{1}{2}$"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text  # lossless round trip
    digits = tok("12345", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits] == list("12345")


def test_encoding_convention(built):
    _, tok = load_model(built[0])
    prompt, response = "Question: Mia has 3 apples.\nAnswer:", " 3 + 1 = 4. Final answer: 4"
    p, r = encode_prompt(tok, prompt), encode_response(tok, response)
    assert p[0] == tok.bos_token_id and tok.bos_token_id not in p[1:]
    assert r[-1] == tok.eos_token_id and tok.bos_token_id not in r
    assert tok.decode(p, skip_special_tokens=True) == prompt
    assert tok.decode(r, skip_special_tokens=True) == response


def test_format_prompt_with_chat_template(built):
    _, tok = load_model(built[0])
    assert format_prompt(tok, "hi") == "hi"  # the built-in tokenizer has no template
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert format_prompt(tok, "hi") == "<s>[user] hi\n[assistant]"
    ids = encode_prompt(tok, "hi")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # no doubled BOS


def test_load_model_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="empty"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float7")
    assert resolve_dtype("bf16") is torch.bfloat16


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"trainer.device='gpu0' is not a device"):
        resolve_device("gpu0", "trainer.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"sampler.device='cuda:1': this machine has no CUDA GPU"):
        resolve_device("cuda:1", "sampler.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_load_model_sets_pad_and_dtype(built):
    model, tok = load_model(built[0], dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16
    assert tok.pad_token_id is not None and not model.training


def test_lr_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.55)  # half-way down the cosine to 0.1
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
