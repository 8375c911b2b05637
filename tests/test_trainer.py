"""The torch trainer on a small random Llama: reference log-probs, accumulation,
schedule of checkpoints, and that preference training moves log-probs the
right way."""

from __future__ import annotations

import math

import pytest
import torch

from irpo.builtin_model import build_model, build_tokenizer
from irpo.config import Config, MethodConfig, ModelConfig, SamplerConfig, TrainerConfig
from irpo.losses import LOSSES
from irpo.modeling import load_model
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.training.hooks import StageHooks
from irpo.training.torch_trainer import (
    TorchTrainerConfig,
    batch_order,
    checkpoint_steps,
    make_optimizer,
    plan_steps,
    train,
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random (not pre-trained) Llama with head_dim 32, saved as an HF checkpoint."""
    examples = ArithTask(ArithConfig(pretrain_size=300, train_size=20, valid_size=5,
                                     test_size=5)).load_split("pretrain")
    tok = build_tokenizer([e.prompt + e.gold_cot for e in examples], 300)
    mcfg = ModelConfig(name="t", builtin="tiny", hidden_size=64, num_heads=2, num_layers=2,
                       intermediate_size=128, max_position_embeddings=256, pretrain_seed=0)
    model = build_model(mcfg, tok)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pairs = [{"id": str(i), "prompt": e.prompt, "chosen": e.gold_cot,
              "rejected": e.gold_cot.replace("Final answer", "Final answer: 0 or")}
             for i, e in enumerate(examples[:24])]
    return path, pairs


def make_cfg(method="rpo", loss="sigmoid", nll_weight=None, **trainer) -> Config:
    """``nll_weight`` None: the NLL weight is alpha (1.0 here), as for rpo."""
    data = "pairs" if LOSSES[loss].needs_reference else "correct"
    return Config(dataset=ArithConfig(), model=ModelConfig(name="t", builtin="tiny"),
                  method=MethodConfig(name=method, data=data, loss=loss, nll_weight=nll_weight),
                  sampler=SamplerConfig(name="hf"),
                  trainer=TorchTrainerConfig(name="torch", **{"lr": 1e-3, "batch_size": 8, "warmup_ratio": 0.0, **trainer}),
                  beta=0.1, alpha=1.0)


def run_train(cfg, path, pairs, tmp_path, seed=0):
    logged = []
    info = train(cfg, path, pairs, tmp_path, lambda m, s: logged.append((s, m)), 100, seed)
    return info, logged


def test_steps_checkpoints_and_batches():
    assert plan_steps(24, TrainerConfig(name="t", batch_size=8, epochs=2.0)) == 6
    assert plan_steps(24, TrainerConfig(name="t", batch_size=8, epochs=2.0, max_steps=4)) == 4
    assert checkpoint_steps(10, 3) == [3, 7, 10] and checkpoint_steps(2, 5) == [1, 2]
    batches = batch_order(10, 4, 5, seed=0)
    assert sorted(batches[0] + batches[1]) == list(range(10))  # an epoch sees each example once
    assert batch_order(10, 4, 5, seed=0) == batches != batch_order(10, 4, 5, seed=1)


def test_first_step_dpo_is_ln2_and_steps_are_global(tiny_ckpt, tmp_path):
    """Policy = reference at step 1, so the DPO term is exactly ln 2 and rewards are 0."""
    path, pairs = tiny_ckpt
    info, logged = run_train(make_cfg(), path, pairs, tmp_path)
    assert info["steps"] == 3 and info["checkpoints"] == ["ckpt-3"]
    assert [s for s, _ in logged] == [101, 102, 103]  # step_offset + step
    first = logged[0][1]
    assert first["train/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert first["logps/chosen_delta"] == pytest.approx(0.0, abs=1e-5)
    assert first["train/loss"] == pytest.approx(first["train/dpo"] + first["train/nll"], rel=1e-5)
    model, _ = load_model(tmp_path / "ckpt-3")
    assert model.num_parameters() > 0


def test_gradient_accumulation_matches_one_big_batch(tiny_ckpt, tmp_path):
    path, pairs = tiny_ckpt
    _, one = run_train(make_cfg(grad_accum=1), path, pairs, tmp_path / "a")
    _, four = run_train(make_cfg(grad_accum=4), path, pairs, tmp_path / "b")
    for (_, a), (_, b) in zip(one, four):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    wa = load_model(tmp_path / "a" / "ckpt-3")[0].state_dict()
    wb = load_model(tmp_path / "b" / "ckpt-3")[0].state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_preference_training_separates_chosen_from_rejected(tiny_ckpt, tmp_path):
    path, pairs = tiny_ckpt
    info, logged = run_train(make_cfg(method="dpo", nll_weight=0.0, epochs=4.0), path, pairs, tmp_path)
    assert logged[0][1]["train/nll"] == 0.0
    last = logged[-1][1]
    assert last["rewards/margin"] > 0.05 and last["rewards/accuracy"] > 0.5
    assert info["chosen_delta_end"] > info["rejected_delta_end"]


def test_nll_only_methods_need_no_reference(tiny_ckpt, tmp_path):
    path, pairs = tiny_ckpt
    sft_pairs = [{k: v for k, v in p.items() if k != "rejected"} for p in pairs]
    info, logged = run_train(make_cfg(method="sft", loss="none", nll_weight=1.0, epochs=3.0), path, sft_pairs, tmp_path)
    assert "logps/rejected" not in logged[0][1] and logged[0][1]["train/dpo"] == 0.0
    assert logged[-1][1]["train/nll"] < logged[0][1]["train/nll"]
    assert "chosen_delta_end" not in info


def test_fused_adamw_takes_the_reference_steps(tiny_ckpt):
    """One fused step is p(1 - lr*wd) - lr*sign(g) (Adam's bias-corrected first step);
    three steps agree with torch's per-tensor AdamW."""
    model, _ = load_model(tiny_ckpt[0])
    twin, _ = load_model(tiny_ckpt[0])
    lr, wd = 1e-2, 0.1
    fused = make_optimizer(model, TorchTrainerConfig(name="torch", lr=lr, weight_decay=wd))
    plain = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=wd, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [(torch.rand(p.shape, generator=g) + 0.1) * torch.sign(torch.randn(p.shape, generator=g))
                 for p in model.parameters()]  # |g| >= 0.1, so eps=1e-8 does not matter
        for params in (model.parameters(), twin.parameters()):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
        fused.step()
        plain.step()
        if step == 0:
            for p, p0, grad in zip(model.parameters(), before, grads):
                assert torch.allclose(p.detach(), p0 * (1 - lr * wd) - lr * torch.sign(grad), atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.detach(), q.detach(), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_trainer_device_without_gpu_is_a_clear_error(tiny_ckpt, tmp_path):
    path, pairs = tiny_ckpt
    with pytest.raises(ValueError, match="trainer.device='cuda': this machine has no CUDA GPU"):
        run_train(make_cfg(device="cuda"), path, pairs[:8], tmp_path)
    info, _ = run_train(make_cfg(device="cpu", max_steps=1), path, pairs[:8], tmp_path)
    assert info["steps"] == 1


def test_hooks_see_the_reference_pass_and_every_step_without_changing_them(tiny_ckpt, tmp_path):
    """on_reference brackets the reference pass, before step 1; on_step comes after every
    step (log_every=2 logs only steps 2 and 3) with the metrics log_metrics gets; the run's
    numbers are the same bits as without hooks. ``layout`` picks the micro-batch layout."""
    path, pairs = tiny_ckpt
    cfg = make_cfg(log_every=2)
    _, plain = run_train(cfg, path, pairs, tmp_path / "plain")
    events, logged = [], []
    hooks = StageHooks(on_reference=events.append,
                       on_step=lambda step, metrics: events.append((step, dict(metrics))))
    train(cfg, path, pairs, tmp_path / "hooked", lambda m, s: logged.append((s, m)), 100, 0,
          hooks=hooks)
    assert logged == plain and [s for s, _ in logged] == [102, 103]
    assert events[:2] == ["start", "end"] and [e[0] for e in events[2:]] == [1, 2, 3]
    assert [(100 + s, m) for s, m in events[3:]] == logged
    assert events[2][1]["train/dpo"] == pytest.approx(math.log(2), abs=1e-5)

    events.clear()
    sft_pairs = [{k: v for k, v in p.items() if k != "rejected"} for p in pairs[:8]]
    train(make_cfg(method="sft", loss="none", nll_weight=1.0), path, sft_pairs, tmp_path / "sft",
          lambda m, s: None, 0, 0, hooks=hooks)
    assert [e[0] for e in events] == [1]  # no reference pass: no on_reference

    padded = []
    train(cfg, path, pairs, tmp_path / "padded", lambda m, s: padded.append((s, m)), 100, 0,
          layout="two_rows")
    for (_, a), (_, b) in zip(plain, padded):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    assert padded != plain  # the same sums in another order: not the same bits
    with pytest.raises(ValueError, match="layout='rows' is not one of"):  # the steps use it too
        train(make_cfg(method="sft", loss="none", nll_weight=1.0), path, sft_pairs,
              tmp_path / "bad", lambda m, s: None, 0, 0, layout="rows")
