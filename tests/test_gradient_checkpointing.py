"""``trainer.gradient_checkpointing``: on in both trainers, and it changes memory, not results.

Checkpointing keeps each decoder layer's input and recomputes the layer in the
backward, so a layer's forward runs twice per step; the gradients are those of
the plain forward up to float rounding (the recompute runs the same kernels on
the same inputs). Tolerances: 1e-6 on the gradients of one micro-batch, 1e-5
on the logged losses over a 3-step run (float32, small random Llama). The slow
test runs it under DeepSpeed ZeRO-3 over 2 CPU processes (what the 70B config,
conf/experiment/paper_gsm8k_70b.yaml, uses) against the torch trainer without it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import TEST_CACHE
from test_trainer import make_cfg, run_train, tiny_ckpt  # noqa: F401  (tiny_ckpt: a fixture)
from test_trainer_deepspeed import LOSS_TOL, SMOOTH, TRAIN, ds_trainer, run, torch_run  # noqa: F401

from irpo.config import TrainerConfig
from irpo.modeling import load_model
from irpo.training import deepspeed_trainer, torch_trainer
from irpo.training.data import tokenize_examples
from irpo.training.torch_trainer import micro_loss, set_gradient_checkpointing


def _loss_and_grads(path, pairs, checkpointing: bool):
    """Loss and gradients of one micro-batch, counting the forward calls of every MLP."""
    model, tok = load_model(path)
    set_gradient_checkpointing(model, TrainerConfig(name="t", gradient_checkpointing=checkpointing))
    model.train()
    calls = []
    for layer in model.model.layers:  # a wrapper: module hooks do not fire in the recompute
        def counted(*args, _forward=layer.mlp.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        layer.mlp.forward = counted
    toks, _ = tokenize_examples(tok, pairs[:4], 256)
    cfg = make_cfg(method="sft", loss="none", nll_weight=1.0)  # NLL only: no reference log-probs needed
    out, _, _ = micro_loss(model, toks, None, cfg, tok.pad_token_id)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, out.loss.item(), grads, len(calls)


def test_flag_recomputes_each_layer_and_leaves_gradients_unchanged(tiny_ckpt):  # noqa: F811
    path, pairs = tiny_ckpt
    plain, loss, grads, calls = _loss_and_grads(path, pairs, False)
    ckpt, loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(path, pairs, True)
    layers = len(plain.model.layers)
    assert not plain.is_gradient_checkpointing and ckpt.is_gradient_checkpointing
    assert (calls, calls_ckpt) == (layers, 2 * layers)  # forward, then the recompute in the backward
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0, name  # every parameter gets a gradient through the checkpoints
        torch.testing.assert_close(grads_ckpt[name], g, rtol=0, atol=1e-6, msg=name)


def test_torch_trainer_same_run_with_checkpointing(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    path, pairs = tiny_ckpt
    loaded = []

    def load_and_keep(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        loaded.append(model)
        return model, tok

    _, plain = run_train(make_cfg(), path, pairs, tmp_path / "plain")
    monkeypatch.setattr(torch_trainer, "load_model", load_and_keep)
    _, ckpt = run_train(make_cfg(gradient_checkpointing=True), path, pairs, tmp_path / "ckpt")
    assert loaded and loaded[0].is_gradient_checkpointing
    assert [s for s, _ in ckpt] == [s for s, _ in plain]
    for (_, a), (_, b) in zip(plain, ckpt):
        for key in ("train/loss", "train/dpo", "train/nll", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    # The saved checkpoint is an ordinary one: the sampler of the next iteration keeps its KV cache.
    saved = json.loads((tmp_path / "ckpt/ckpt-3/config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert saved.get("use_cache", True) == original.get("use_cache", True)


@pytest.mark.slow
def test_deepspeed_zero3_with_checkpointing_same_loss_curve_as_torch(tiny_ckpt, torch_run, tmp_path,  # noqa: F811
                                                                     capfd):
    path, pairs = tiny_ckpt
    _, ref_logged, _ = torch_run
    tcfg = ds_trainer(zero_stage=3, num_processes=2, gradient_checkpointing=True, **TRAIN)
    cfg = dataclasses.replace(make_cfg(), trainer=tcfg, cache_dir=str(TEST_CACHE))
    info, logged = run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)
    assert info["world_size"] == 2
    workers = capfd.readouterr()  # the workers' logs (torchrun's children write to this fd)
    assert len(re.findall(r"ZeRO-3 engine on cpu: .*, gradient checkpointing", workers.out + workers.err)) == 2
    assert [s for s, _ in logged] == [s for s, _ in ref_logged] == list(range(101, 107))
    diffs = {k: max(abs(a[k] - b[k]) for (_, a), (_, b) in zip(logged, ref_logged)) for k in SMOOTH}
    print("ZeRO-3 + gradient checkpointing vs torch, max abs diff per step:", json.dumps(diffs))
    assert diffs["train/loss"] < LOSS_TOL, diffs
    assert all(d < 1e-4 for d in diffs.values()), diffs
