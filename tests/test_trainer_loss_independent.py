"""The first training step's loss, computed here without the project's code, against both trainers.

Everything the expected value needs is done here from scratch: tokenisation with the
checkpoint's own tokenizer (prompt with its special tokens, response without, then EOS: the
convention the README's loss is defined on), per-sequence log-prob sums from one plain
forward pass per sequence in float64 softmax, and the README's loss

    mean_b −log σ(β[(πθ(w) − ref(w)) − (πθ(l) − ref(l))])  +  α · mean_b (−πθ(w) / |w|)

with α = 0.7 and β = 0.3 (and, for ``method.loss=ipo``, IPO's per-pair
(z − 1/(2β))², z = (πθ(w) − ref(w)) − (πθ(l) − ref(l)), in place of the −log σ(βz)
term), chosen and rejected responses of different lengths, and reference
log-probs supplied as the sampler supplies them (``chosen_ref_logprob`` /
``rejected_ref_logprob``), some missing (a gold CoT the sampler did not score, a pair with
no sampler log-probs), which the trainer then computes from M0 itself. The supplied ones are
M0's own values moved by known offsets (the agreement check is off), so every pair has a
different, non-zero DPO margin and β matters. At step 1 the policy is M0, so the trainer's
logged step-1 loss must be this value. A trainer that ignores α, divides the NLL by the
loser's length, drops the sampler's references or mixes up the pairs fails here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TEST_CACHE
from test_trainer import make_cfg, tiny_ckpt  # noqa: F401  (tiny_ckpt: a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from irpo.training import deepspeed_trainer, torch_trainer
from irpo.training.deepspeed_trainer import DeepSpeedTrainerConfig

ALPHA, BETA, TOL = 0.7, 0.3, 1e-5
# The trainer's log-prob sums are float32 (|πθ(w)| ≈ 250 here: ~1e-5 apart from float64);
# IPO's slope 2|z − 1/(2β)| ≈ 3 amplifies that difference in z, where DPO's β·σ' ≤ 0.075
# damps it. A wrong IPO (β for 1/(2β), a missing square) is off by more than 0.1.
IPO_TOL = 1e-4
# (offset of the supplied chosen reference, of the rejected one); None: not supplied.
OFFSETS = [(0.4, -0.9), (-1.2, 0.5), (None, 0.8), (None, None)]


def sequence_logprob(model, tok, prompt: str, response: str) -> tuple[float, int]:
    """log p(response | prompt) summed over the response's tokens (EOS included), and their count."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + r])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(p) + j - 1, r[j]]) for j in range(len(r))), len(r)


@pytest.fixture(scope="module")
def case(tiny_ckpt):  # noqa: F811
    """Four pairs with sampler references (some missing) and the expected step-1 metrics."""
    path, base = tiny_ckpt
    tok = AutoTokenizer.from_pretrained(path)
    assert not getattr(tok, "chat_template", None)  # the prompt is used as written
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pairs, z, nll = [], [], []
    for i, (off_c, off_r) in enumerate(OFFSETS):
        prompt = base[i]["prompt"]
        chosen = base[i]["chosen"]
        rejected = "Let me guess.\nFinal answer: " + "9" * (i + 1)  # much shorter than chosen
        pc, n_c = sequence_logprob(model, tok, prompt, chosen)
        pr, n_r = sequence_logprob(model, tok, prompt, rejected)
        assert n_c != n_r
        ref_c = pc + off_c if off_c is not None else pc  # missing: the trainer scores M0 itself
        ref_r = pr + off_r if off_r is not None else pr
        pairs.append({"id": str(i), "prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "chosen_ref_logprob": ref_c if off_c is not None else None,
                      "rejected_ref_logprob": ref_r if off_r is not None else None})
        z.append((pc - ref_c) - (pr - ref_r))
        nll.append(-pc / n_c)
    mean = lambda xs: sum(xs) / len(xs)
    pref = {"sigmoid": [-math.log(1 / (1 + math.exp(-BETA * zb))) for zb in z],
            "ipo": [(zb - 1 / (2 * BETA)) ** 2 for zb in z]}
    want = {loss: {"train/dpo": mean(p), "train/nll": mean(nll),
                   "train/loss": mean(p) + ALPHA * mean(nll),
                   "rewards/margin": BETA * mean(z)}  # β·z whatever the loss
            for loss, p in pref.items()}
    assert abs(BETA * mean(z)) > 0.05 and mean(nll) > 1  # both terms matter
    assert abs(mean(pref["ipo"]) - (1 / (2 * BETA)) ** 2) > 0.1  # the margins move IPO too
    return path, pairs, want


def trainer_cfg(trainer, loss="sigmoid"):
    """rpo (or ``loss``) with α = 0.7, β = 0.3; one step over all four pairs; sampler
    references used, not checked."""
    cfg = make_cfg(loss=loss, batch_size=4, epochs=1.0, ref_check_pairs=0,
                   sampler_ref_logprobs=True)
    if trainer is not None:
        cfg = dataclasses.replace(cfg, trainer=trainer, cache_dir=str(TEST_CACHE))
    return dataclasses.replace(cfg, alpha=ALPHA, beta=BETA)


def first_step(train_fn, cfg, path, pairs, out) -> dict:
    logged = []
    info = train_fn(cfg, path, pairs, out, lambda m, s: logged.append((s, m)), 0, 0)
    assert info["steps"] == 1 and logged[0][0] == 1
    assert info["ref_rows_from_sampler"] == 5 and info["ref_rows_computed"] == 3
    return logged[0][1]


def check(got: dict, want: dict, tol: float = TOL) -> None:
    for key, value in want.items():
        assert abs(got[key] - value) < tol, (key, got[key], value)


def test_torch_trainer_first_step_loss_is_the_independent_one(case, tmp_path):
    path, pairs, want = case
    check(first_step(torch_trainer.train, trainer_cfg(None), path, pairs, tmp_path),
          want["sigmoid"])


def test_torch_trainer_first_step_ipo_loss_is_the_independent_one(case, tmp_path):
    """method.loss=ipo: the same pairs, references and NLL; the IPO term from its formula."""
    path, pairs, want = case
    check(first_step(torch_trainer.train, trainer_cfg(None, loss="ipo"), path, pairs, tmp_path),
          want["ipo"], IPO_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_trainer_first_step_loss_is_the_independent_one(case, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    path, pairs, want = case
    tcfg = DeepSpeedTrainerConfig(name="deepspeed", zero_stage=zero_stage, num_processes=2,
                                  lr=1e-3, batch_size=4, warmup_ratio=0.0, ref_check_pairs=0)
    check(first_step(deepspeed_trainer.train, trainer_cfg(tcfg), path, pairs, tmp_path),
          want["sigmoid"])
