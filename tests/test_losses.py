"""Hand-derived tests of irpo.losses (modelled on torchtune's DPO loss tests).

Every expected number is worked out in a comment from the formulas:
    DPO_b = −log σ(β z_b),   z_b = (πc − rc) − (πr − rr)
    IPO_b = (z_b − 1/(2β))²
    NLL_b = −πc / |w|
    loss  = dpo_weight · mean_b PREF_b + α · mean_b NLL_b   (PREF: DPO, IPO or none)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irpo.losses import (
    LOSSES,
    dpo_loss,
    get_loss,
    ipo_loss,
    nll_loss,
    preference_loss,
    sequence_logprobs,
)

LN2 = math.log(2.0)


# ------------------------------------------------------------ sequence_logprobs


def _hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2, T=4, V=3. Positions whose labels are ignored hold large junk values,
    so a wrong shift or a missing mask changes the result by a lot."""
    junk = [50.0, -50.0, 7.0]
    p121 = [math.log(1.0), math.log(2.0), math.log(1.0)]  # softmax -> [1/4, 1/2, 1/4]
    flat = [0.0, 0.0, 0.0]  # softmax -> [1/3, 1/3, 1/3]
    logits = torch.tensor(
        [
            # seq 0: prompt = tokens 0..1, response = tokens 2..3
            [junk, p121, p121, junk],
            # seq 1: prompt = token 0, response = token 1, tokens 2..3 padding
            [flat, junk, junk, junk],
        ]
    )
    labels = torch.tensor(
        [
            [-100, -100, 2, 1],
            [-100, 0, -100, -100],
        ]
    )
    return logits, labels


def test_sequence_logprobs_hand_computed():
    logits, labels = _hand_logits()
    logps, counts = sequence_logprobs(logits, labels)
    # seq 0: logits[1] predicts label 2 -> ln(1/4); logits[2] predicts label 1 -> ln(1/2)
    #        sum = ln(1/8) = −2.0794415, count 2
    # seq 1: logits[0] predicts label 0 -> ln(1/3) = −1.0986123, count 1
    torch.testing.assert_close(logps, torch.tensor([-2.0794415, -1.0986123]), atol=1e-6, rtol=0)
    assert counts.tolist() == [2, 1]
    assert logps.dtype == torch.float32


def test_sequence_logprobs_custom_ignore_index_and_all_masked():
    logits, labels = _hand_logits()
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    labels[1] = -1  # sequence 1 entirely masked: sum 0 over 0 positions
    logps, counts = sequence_logprobs(logits, labels, ignore_index=-1)
    torch.testing.assert_close(logps, torch.tensor([-2.0794415, 0.0]), atol=1e-6, rtol=0)
    assert counts.tolist() == [2, 0]


def test_sequence_logprobs_matches_cross_entropy_and_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100  # prompt
    labels[2, 5:] = -100  # padding
    # Independent reference: token NLL from cross_entropy on the shifted tensors.
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none"
    ).view(3, 6)
    logps, counts = sequence_logprobs(logits, labels)
    torch.testing.assert_close(logps, -ce.sum(-1), atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [5, 5, 3]

    bf16_logps, _ = sequence_logprobs(logits.bfloat16(), labels)
    assert bf16_logps.dtype == torch.float32
    # Same values up to the bf16 rounding of the inputs (not of the reduction).
    torch.testing.assert_close(bf16_logps, logps, atol=0.1, rtol=0.02)


def test_sequence_logprobs_gradient_only_from_unmasked_positions():
    logits, labels = _hand_logits()
    logits.requires_grad_(True)
    logps, _ = sequence_logprobs(logits, labels)
    logps.sum().backward()
    # Junk positions (ignored labels or the last position, which predicts nothing) get no gradient.
    assert torch.count_nonzero(logits.grad[0, 0]) == 0
    assert torch.count_nonzero(logits.grad[0, 3]) == 0
    assert torch.count_nonzero(logits.grad[1, 1:]) == 0
    # d ln softmax(x)_y / dx = onehot(y) − p: at seq 0 pos 1 (label 2, p=[1/4,1/2,1/4])
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([-0.25, -0.5, 0.75]))


def test_sequence_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


# --------------------------------------------------------------------- dpo_loss


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0, 10.0])
def test_dpo_equals_ln2_when_policy_is_reference(beta):
    # z = 0 for every example, so the loss is −log σ(0) = ln 2 whatever β is.
    torch.manual_seed(1)
    chosen, rejected = -10 * torch.rand(4), -10 * torch.rand(4)
    losses = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta)
    assert torch.equal(losses, torch.full((4,), LN2))
    assert losses.mean().item() == pytest.approx(LN2, abs=1e-7)


def test_dpo_loss_specific_value():
    # πc=−1, πr=−3, rc=−2, rr=−2, β=0.1: z = 1 − (−1) = 2, βz = 0.2
    # −log σ(0.2) = ln(1 + e^−0.2) = ln 1.8187308 = 0.5981388694
    loss = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1
    )
    assert loss.item() == pytest.approx(0.5981388694, abs=1e-6)


def test_dpo_loss_torchtune_inputs():
    # torchtune's fixture: z = [0, 10, 20], βz = [0, 1, 2]
    # losses = ln(1 + e^−βz) = [ln 2, ln(1 + 1/e), ln(1 + 1/e²)] = [0.693147, 0.313262, 0.126928]
    losses = dpo_loss(
        torch.tensor([-0.5, -10.0, -1.0]),
        torch.tensor([-0.1, -30.0, -21.0]),
        torch.tensor([-0.5, -10.1, -0.1]),
        torch.tensor([-0.1, -20.1, -0.1]),
        0.1,
    )
    torch.testing.assert_close(
        losses, torch.tensor([0.6931472, 0.3132617, 0.1269280]), atol=1e-5, rtol=0
    )


def test_dpo_loss_is_stable_for_huge_margins():
    # βz = −1000: −log σ(−1000) = 1000 (+ e^−1000); a naive log(sigmoid) would give inf.
    loss = dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                    torch.tensor([-10000.0]), 0.1)  # fmt: skip
    assert loss.item() == pytest.approx(1000.0)
    # βz = +1000: loss e^−1000 underflows to 0, not nan.
    loss = dpo_loss(torch.tensor([0.0]), torch.tensor([-10000.0]), torch.tensor([0.0]),
                    torch.tensor([0.0]), 0.1)  # fmt: skip
    assert loss.item() == 0.0


# --------------------------------------------------------------------- ipo_loss


def test_ipo_loss_hand_computed_values_and_gradients():
    # β = 0.5, so the target margin 1/(2β) = 1.
    # pair 0: πc=−2, rc=−3, πr=−4, rr=−3.5: z = (−2+3) − (−4+3.5) = 1 − (−0.5) = 1.5
    #         IPO = (1.5 − 1)² = 0.25
    # pair 1: πc=−5, rc=−4, πr=−1, rr=−2:   z = (−5+4) − (−1+2) = −1 − 1 = −2
    #         IPO = (−2 − 1)² = 9
    pc = torch.tensor([-2.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -1.0], requires_grad=True)
    rc = torch.tensor([-3.0, -4.0], requires_grad=True)
    rr = torch.tensor([-3.5, -2.0], requires_grad=True)
    losses = ipo_loss(pc, pr, rc, rr, 0.5)
    torch.testing.assert_close(losses, torch.tensor([0.25, 9.0]), atol=0, rtol=0)
    losses.sum().backward()
    # d IPO_b / d πc_b = 2(z_b − 1) = [2·0.5, 2·(−3)] = [1, −6]; d / d πr_b = −that
    torch.testing.assert_close(pc.grad, torch.tensor([1.0, -6.0]))
    torch.testing.assert_close(pr.grad, torch.tensor([-1.0, 6.0]))
    assert rc.grad is None and rr.grad is None  # the reference is detached, as in DPO


@pytest.mark.parametrize("beta, want", [(0.1, 25.0), (0.5, 1.0), (2.0, 0.0625)])
def test_ipo_at_the_reference_is_the_squared_target_margin(beta, want):
    # policy = reference: z = 0, IPO = (0 − 1/(2β))² = 1/(4β²): β=0.1 -> 25, 0.5 -> 1, 2 -> 1/16
    chosen, rejected = torch.tensor([-7.0, -1.0]), torch.tensor([-2.0, -9.0])
    losses = ipo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta)
    torch.testing.assert_close(losses, torch.full((2,), want), atol=1e-6, rtol=0)


def test_ipo_plus_nll_combined_hand_computed():
    # The pairs of test_ipo_loss_hand_computed_values_and_gradients, β = 0.5, α = 0.5,
    # winner lengths [2, 4]: IPO mean = (0.25 + 9)/2 = 4.625
    # NLL = [2/2, 5/4] = [1, 1.25], mean 1.125;  loss = 4.625 + 0.5 · 1.125 = 5.1875
    # rewards β(πc − rc) = [0.5, −0.5], β(πr − rr) = [−0.25, 0.5]
    # margins [0.75, −1.0] -> mean −0.125; accuracy [1, 0] -> 0.5
    pc, pr = torch.tensor([-2.0, -5.0]), torch.tensor([-4.0, -1.0])
    rc, rr = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -2.0])
    out = preference_loss(pc, torch.tensor([2, 4]), 0.5, 0.5, policy_rejected=pr,
                          ref_chosen=rc, ref_rejected=rr, loss="ipo")
    assert out.loss.item() == pytest.approx(5.1875, abs=1e-6)
    assert (out.dpo.item(), out.nll.item()) == (pytest.approx(4.625), pytest.approx(1.125))
    assert out.reward_margin.item() == pytest.approx(-0.125)
    assert out.reward_accuracy.item() == 0.5


# --------------------------------------------------------------------- registry


def test_registry_names_each_loss_its_function_and_its_needs():
    assert {n: (s.fn, s.needs_reference) for n, s in LOSSES.items()} == {
        "sigmoid": (dpo_loss, True), "ipo": (ipo_loss, True), "none": (None, False)}
    assert get_loss("ipo") is LOSSES["ipo"]


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(ValueError, match="method.loss='hinge' is not a known loss; known: ipo, none, sigmoid"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="method.loss='hinge' is not a known loss"):
        preference_loss(torch.tensor([-1.0]), torch.tensor([1]), 0.1, 1.0, loss="hinge")


def test_loss_none_is_the_nll_only_method():
    # No pair inputs needed; NLL 8/4 = 2, 3/3 = 1 -> mean 1.5, α = 1
    out = preference_loss(torch.tensor([-8.0, -3.0]), torch.tensor([4, 3]), 0.1, 1.0, loss="none")
    assert (out.loss.item(), out.dpo.item()) == (pytest.approx(1.5), 0.0)
    with pytest.raises(ValueError, match="nothing to train"):
        preference_loss(torch.tensor([-8.0]), torch.tensor([4]), 0.1, 0.0, loss="none")


# --------------------------------------------------------------------- nll_loss


def test_nll_is_normalised_per_sequence_not_per_token():
    logps = torch.tensor([-10.0, -60.0])
    lengths = torch.tensor([5, 20])
    per_example = nll_loss(logps, lengths)
    # −(−10)/5 = 2.0 and −(−60)/20 = 3.0
    torch.testing.assert_close(per_example, torch.tensor([2.0, 3.0]))
    out = preference_loss(logps, lengths, beta=0.1, alpha=1.0, dpo_weight=0.0)
    # per-sequence mean (2 + 3)/2 = 2.5; per-token would be 70/25 = 2.8
    assert out.nll.item() == pytest.approx(2.5)
    assert out.loss.item() == pytest.approx(2.5)
    assert out.loss.item() != pytest.approx(70 / 25)


def test_nll_rejects_empty_responses():
    with pytest.raises(ValueError, match="at least one response token"):
        nll_loss(torch.tensor([-1.0, 0.0]), torch.tensor([3, 0]))


# -------------------------------------------------------------- preference_loss


def _two_pairs(requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """ex 0: πc=−1, πr=−3,   rc=−2, rr=−2, |w|=4 -> z=2,    βz=0.2
    ex 1: πc=−6, πr=−5.5, rc=−5, rr=−5, |w|=3 -> z=−0.5, βz=−0.05"""
    pc = torch.tensor([-1.0, -6.0], requires_grad=requires_grad)
    pr = torch.tensor([-3.0, -5.5], requires_grad=requires_grad)
    # The reference is built with requires_grad to prove the loss never trains it.
    rc = torch.tensor([-2.0, -5.0], requires_grad=True)
    rr = torch.tensor([-2.0, -5.0], requires_grad=True)
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "len": torch.tensor([4, 3])}


def _rpo(x: dict[str, torch.Tensor], alpha: float, dpo_weight: float = 1.0):
    return preference_loss(
        x["pc"], x["len"], 0.1, alpha,
        policy_rejected=x["pr"], ref_chosen=x["rc"], ref_rejected=x["rr"], dpo_weight=dpo_weight,
    )  # fmt: skip


def test_rpo_combined_loss_hand_computed():
    x = _two_pairs()
    out = _rpo(x, alpha=0.5)
    # DPO: −log σ(0.2) = 0.5981389, −log σ(−0.05) = 0.7184596 -> mean 0.6582993
    # NLL: 1/4 = 0.25, 6/3 = 2.0 -> mean 1.125
    # loss = 0.6582993 + 0.5 · 1.125 = 1.2207993
    assert out.dpo.item() == pytest.approx(0.6582993, abs=1e-6)
    assert out.nll.item() == pytest.approx(1.125, abs=1e-6)
    assert out.loss.item() == pytest.approx(1.2207993, abs=1e-6)
    # rewards β(π − r): chosen [0.1·1, 0.1·(−1)], rejected [0.1·(−1), 0.1·(−0.5)]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, -0.05]))
    # accuracy: 0.1 > −0.1 yes, −0.1 > −0.05 no -> 0.5; margin mean(0.2, −0.05) = 0.075
    assert out.reward_accuracy.item() == pytest.approx(0.5)
    assert out.reward_margin.item() == pytest.approx(0.075, abs=1e-6)
    assert not out.chosen_rewards.requires_grad and not out.reward_margin.requires_grad


def test_rpo_gradients_reach_policy_only():
    x = _two_pairs()
    _rpo(x, alpha=0.5).loss.backward()
    # dL/dπc_b = (1/B)(−β σ(−βz_b)) + α (1/B)(−1/|w_b|), B=2, α=0.5:
    #   ex 0: 0.5·(−0.1·σ(−0.2)) + 0.25·(−1/4) = −0.0225083 − 0.0625    = −0.0850083
    #   ex 1: 0.5·(−0.1·σ(0.05)) + 0.25·(−1/3) = −0.0256249 − 0.0833333 = −0.1089582
    # dL/dπr_b = (1/B) β σ(−βz_b) = [0.0225083, 0.0256249]
    torch.testing.assert_close(x["pc"].grad, torch.tensor([-0.0850083, -0.1089582]))
    torch.testing.assert_close(x["pr"].grad, torch.tensor([0.0225083, 0.0256249]))
    assert x["rc"].grad is None and x["rr"].grad is None


def test_alpha_zero_is_exactly_dpo_loss_and_gradients():
    x, y = _two_pairs(), _two_pairs()
    out = _rpo(x, alpha=0.0)
    ref = dpo_loss(y["pc"], y["pr"], y["rc"], y["rr"], 0.1).mean()
    assert torch.equal(out.loss, ref)
    assert out.nll.item() == 0.0
    out.loss.backward()
    ref.backward()
    assert torch.equal(x["pc"].grad, y["pc"].grad)
    assert torch.equal(x["pr"].grad, y["pr"].grad)


def test_dpo_at_initialisation_is_ln2():
    # policy == reference: every z is 0, DPO term = ln 2, rewards 0, accuracy 0 (no strict win)
    pc, pr = torch.tensor([-3.0, -7.0, -1.5]), torch.tensor([-4.0, -2.0, -9.0])
    out = preference_loss(pc, torch.tensor([3, 7, 2]), 0.1, 0.0,
                          policy_rejected=pr, ref_chosen=pc.clone(), ref_rejected=pr.clone())  # fmt: skip
    assert out.loss.item() == pytest.approx(LN2, abs=1e-7)
    assert out.reward_accuracy.item() == 0.0 and out.reward_margin.item() == 0.0


def test_nll_only_method_needs_no_pairs_and_reports_zero_rewards():
    pc = torch.tensor([-8.0, -3.0], requires_grad=True)
    out = preference_loss(pc, torch.tensor([4, 3]), 0.1, 1.0, dpo_weight=0.0)
    # NLL: 8/4 = 2, 3/3 = 1 -> mean 1.5; DPO disabled -> 0
    assert out.loss.item() == pytest.approx(1.5)
    assert out.dpo.item() == 0.0
    assert out.chosen_rewards.tolist() == [0.0, 0.0]
    assert out.reward_accuracy.item() == 0.0
    out.loss.backward()
    # d/dπc of mean(−πc/|w|) = −1/(B|w|) = [−1/8, −1/6]
    torch.testing.assert_close(pc.grad, torch.tensor([-0.125, -1 / 6]))


def test_dpo_weight_scales_only_the_dpo_term():
    x = _two_pairs(requires_grad=False)
    # 2 · 0.6582993 + 1 · 1.125 = 2.4415985
    assert _rpo(x, alpha=1.0, dpo_weight=2.0).loss.item() == pytest.approx(2.4415985, abs=1e-6)


@pytest.mark.parametrize("missing", ["policy_rejected", "ref_chosen", "ref_rejected"])
def test_missing_dpo_inputs_raise(missing):
    x = _two_pairs(requires_grad=False)
    kwargs = {"policy_rejected": x["pr"], "ref_chosen": x["rc"], "ref_rejected": x["rr"]}
    kwargs[missing] = None
    with pytest.raises(ValueError, match=f"dpo_weight=1.0 needs {missing}"):
        preference_loss(x["pc"], x["len"], 0.1, 1.0, **kwargs)


def test_missing_all_dpo_inputs_names_them_all():
    with pytest.raises(ValueError, match="needs policy_rejected, ref_chosen, ref_rejected"):
        preference_loss(torch.tensor([-1.0]), torch.tensor([1]), 0.1, 1.0)


@pytest.mark.parametrize("bad", ["len", "pr", "rc", "rr"])
def test_shape_mismatch_raises(bad):
    x = _two_pairs(requires_grad=False)
    x[bad] = torch.cat([x[bad], x[bad][:1]])  # 3 values against B=2
    with pytest.raises(ValueError, match="has shape \\(3,\\) but policy_chosen has \\(2,\\)"):
        _rpo(x, alpha=1.0)


def test_invalid_weights_and_policy_shape_raise():
    x = _two_pairs(requires_grad=False)
    with pytest.raises(ValueError, match="nothing to train"):
        _rpo(x, alpha=0.0, dpo_weight=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        _rpo(x, alpha=-1.0)
    with pytest.raises(ValueError, match="must be \\[B\\]"):
        preference_loss(torch.zeros(2, 3), torch.tensor([1, 1]), 0.1, 1.0, dpo_weight=0.0)
