"""Losses of every method, as pure functions of log-probabilities.

No model code lives here: the trainer runs the policy (and, for a preference loss, the
reference) forward, turns logits into per-sequence log-probs with
:func:`sequence_logprobs`, and hands those to :func:`preference_loss`::

    pc, n_c = sequence_logprobs(policy_logits_chosen, labels_chosen)
    pr, _ = sequence_logprobs(policy_logits_rejected, labels_rejected)
    out = preference_loss(pc, n_c, beta, alpha, policy_rejected=pr,
                          ref_chosen=rc, ref_rejected=rr, loss="sigmoid")
    out.loss.backward()

The methods (the README's method table) are weightings of two terms (Pang et al.
2024, eq. 1, with the DPO term generalised to a named preference loss):

    loss = dpo_weight · mean_b PREF_b  +  alpha · mean_b (−log Mθ(w_b|x_b) / |w_b|)

PREF is the loss ``method.loss`` names in :data:`LOSSES`: ``sigmoid`` (DPO), ``ipo``
(IPO) or ``none`` (no preference term; sft and star, which need neither rejected
sequences nor a reference). Adding a loss is one per-example function here, with
hand-derived tests, one :data:`LOSSES` registration, and a method YAML that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from irpo.registry import Registry


def sequence_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of log p(label) over non-ignored positions, and their count.

    ``logits`` [B, T, V] at position t predict the token at t+1, so they are
    shifted here (``logits[:, :-1]`` against ``labels[:, 1:]``); ``labels`` [B, T]
    holds the input ids with prompt and padding positions set to ``ignore_index``.
    Returns ``(logps [B] float32, counts [B] int64)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_logprobs: logits must be [B, T, V] and labels [B, T], "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    # float32 because a bf16 log-sum-exp over a large vocabulary loses the
    # small differences between policy and reference that DPO is made of.
    # .float() is a no-op (no copy) when the logits are already float32.
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != ignore_index
    # Ignored positions get a valid dummy index for gather, then masked out.
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    # log p(y) = logit_y − logsumexp(logits): only [B, T−1] results are kept,
    # no second [B, T−1, V] log-softmax tensor.
    token_logit = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logit - torch.logsumexp(logits, dim=-1)
    logps = (token_logps * mask).sum(-1)
    return logps, mask.sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per-example sigmoid DPO loss [B]: −log σ(β[(πc − rc) − (πr − rr)]).

    The reference log-probs are detached: the reference model is frozen, and a
    caller that forgot ``torch.no_grad()`` must not train it by accident.
    """
    logits = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    # logsigmoid, not log(sigmoid(.)): stays finite for large negative margins.
    return -F.logsigmoid(beta * logits)


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per-example IPO loss [B]: ((πc − rc) − (πr − rr) − 1/(2β))² (Azar et al. 2023, eq. 17).

    β plays the paper's τ: the log-ratio margin the loss pulls each pair towards is
    1/(2β), so a smaller β asks for a larger margin. The log-probs are the summed
    sequence log-probs, as :func:`dpo_loss` uses them (TRL's ``ipo`` averages over
    tokens instead); one sequence-level margin per pair keeps the two losses
    comparable at the same β. The reference log-probs are detached, as in DPO.
    """
    logits = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return (logits - 1.0 / (2.0 * beta)) ** 2


def nll_loss(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-example length-normalised NLL [B]: −log Mθ(w|x) / |w|.

    Normalised per sequence by the winner's own response length, as in the
    paper; the batch mean is taken by the caller (:func:`preference_loss`).
    This is not the per-token mean over the batch, which weights long
    sequences more.
    """
    if bool((chosen_lengths <= 0).any()):
        raise ValueError(
            "nll_loss: every chosen sequence needs at least one response token, "
            f"got lengths {chosen_lengths.tolist()} (is the whole response masked?)"
        )
    return -chosen_logps / chosen_lengths


@dataclass(frozen=True)
class PreferenceLoss:
    """A named preference loss: its per-example function and what it needs as input."""

    # (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> [B]; None: no term.
    fn: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor] | None
    # Rejected sequences (data=pairs) and the reference's log-probs of chosen and rejected:
    # the driver scores gold winners and the trainers compute reference log-probs only then.
    needs_reference: bool


# The names ``method.loss`` accepts (irpo.registry: config validation lists them).
LOSSES: Registry[PreferenceLoss] = Registry("loss", "method.loss")
LOSSES.register("sigmoid", PreferenceLoss(dpo_loss, needs_reference=True))  # DPO (Rafailov et al. 2023)
LOSSES.register("ipo", PreferenceLoss(ipo_loss, needs_reference=True))  # IPO (Azar et al. 2023)
LOSSES.register("none", PreferenceLoss(None, needs_reference=False))  # NLL only: sft, star


def get_loss(name: str) -> PreferenceLoss:
    """The entry of :data:`LOSSES` called ``name``; ValueError listing the known names."""
    return LOSSES.get(name)


@dataclass
class LossOutput:
    """The loss to back-propagate and the detached quantities worth logging."""

    loss: Tensor  # scalar, what backward() is called on
    dpo: Tensor  # scalar mean of the preference term, DPO's or the named one (0 if disabled)
    nll: Tensor  # scalar mean of the normalised NLL (0 if disabled)
    chosen_rewards: Tensor  # [B] β(πc − rc), detached (zeros when no reference)
    rejected_rewards: Tensor  # [B] β(πr − rr), detached (zeros when no reference)
    reward_accuracy: Tensor  # scalar mean(chosen_rewards > rejected_rewards)
    reward_margin: Tensor  # scalar mean(chosen_rewards − rejected_rewards)


def _check_inputs(
    policy_chosen: Tensor,
    chosen_lengths: Tensor,
    alpha: float,
    dpo_weight: float,
    others: dict[str, Tensor | None],
) -> bool:
    """Validate the arguments of :func:`preference_loss`; True if pair inputs are all given."""
    if policy_chosen.dim() != 1:
        raise ValueError(
            f"preference_loss: policy_chosen must be [B], got shape {tuple(policy_chosen.shape)}"
        )
    if alpha < 0 or dpo_weight < 0:
        raise ValueError(f"preference_loss: alpha={alpha} and dpo_weight={dpo_weight} must be >= 0")
    if alpha == 0 and dpo_weight == 0:
        raise ValueError("preference_loss: alpha=0 and dpo_weight=0 leave nothing to train")
    shapes = {"chosen_lengths": chosen_lengths, **others}
    for name, t in shapes.items():
        if t is not None and t.shape != policy_chosen.shape:
            raise ValueError(
                f"preference_loss: {name} has shape {tuple(t.shape)} but policy_chosen has "
                f"{tuple(policy_chosen.shape)}; every input is one value per example"
            )
    missing = [name for name, t in others.items() if t is None]
    if dpo_weight > 0 and missing:
        raise ValueError(
            f"preference_loss: dpo_weight={dpo_weight} needs {', '.join(missing)}; "
            "pass the rejected and reference log-probs, or set dpo_weight=0 (or loss='none') "
            "for an NLL-only method"
        )
    return not missing


def preference_loss(
    policy_chosen: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    alpha: float,
    *,
    policy_rejected: Tensor | None = None,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    dpo_weight: float = 1.0,
    loss: str = "sigmoid",
) -> LossOutput:
    """``dpo_weight · mean(PREF) + alpha · mean(nll_loss)`` plus reward statistics.

    PREF is the per-example preference loss ``loss`` names in :data:`LOSSES`
    (``sigmoid``: :func:`dpo_loss`; ``ipo``: :func:`ipo_loss`; ``none``: no term, as
    dpo_weight=0). All inputs are [B]. A term whose weight is 0 is not computed at all,
    so alpha=0 gives exactly the preference loss (and gradients), and NLL-only methods
    need neither rejected sequences nor a reference. Raises ValueError on an unknown
    loss, missing pair inputs, mismatched shapes or negative weights.
    """
    pref = get_loss(loss).fn
    if pref is None:  # loss="none": the NLL-only methods
        dpo_weight = 0.0
    others = {
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    have_pairs = _check_inputs(policy_chosen, chosen_lengths, alpha, dpo_weight, others)
    zero = policy_chosen.new_zeros(())
    dpo = zero
    nll = zero
    terms: list[Tensor] = []
    if dpo_weight > 0:
        dpo = pref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).mean()
        terms.append(dpo_weight * dpo)
    if alpha > 0:
        nll = nll_loss(policy_chosen, chosen_lengths).mean()
        terms.append(alpha * nll)
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]

    if have_pairs:
        # Implicit DPO rewards β·log-ratio, whatever the loss (IPO's margin is the same
        # log-ratio difference); logged, also for NLL-only runs given a reference.
        chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
        rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    else:
        chosen_rewards = torch.zeros_like(policy_chosen).detach()
        rejected_rewards = torch.zeros_like(policy_chosen).detach()
    return LossOutput(
        loss=loss,
        dpo=dpo.detach(),
        nll=nll.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )
