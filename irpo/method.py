"""What a method config asks of the driver and the trainers, read in one place.

A method (``conf/method/*.yaml``, schema ``irpo.config.MethodConfig``) is a data policy
(``method.data``), a preference loss named in :data:`irpo.losses.LOSSES`
(``method.loss``) and the weight of the winner's length-normalised NLL
(``method.nll_weight``; None follows the top-level ``alpha``, the knob sweeps vary).
Whether a stage needs rejected sequences and reference log-probs is a property of the
named loss (:func:`needs_reference`), not of the method's name. The method group's
cross-field rules live here too, so that :func:`irpo.config.validate` stays generic.
"""

from __future__ import annotations

from irpo.losses import LOSSES, PreferenceLoss

DATA_POLICIES = ("gold", "correct", "pairs")


def loss_of(cfg) -> PreferenceLoss:
    """The registry entry of ``cfg.method.loss`` (validated by :func:`method_checks`)."""
    return LOSSES[cfg.method.loss]


def needs_reference(cfg) -> bool:
    """Whether the method's loss needs rejected sequences and reference log-probs."""
    return loss_of(cfg).needs_reference


def nll_weight(cfg) -> float:
    """The NLL term's weight: ``method.nll_weight``, or the top-level ``alpha`` when None.

    rpo, rpo_2x and ipo follow alpha; dpo fixes 0 (and refuses alpha > 0); sft and star
    fix 1 (alpha does not apply to them).
    """
    w = cfg.method.nll_weight
    return cfg.alpha if w is None else w


def method_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) pairs of the method's rules; an unknown loss is the only one then."""
    m = cfg.method
    try:
        spec = LOSSES.get(m.loss)
    except ValueError as err:  # "method.loss='x' is not a known loss; known: ..."
        return [(False, str(err))]
    return [
        (m.data in DATA_POLICIES, f"method.data={m.data!r} must be gold, correct or pairs"),
        (
            not (spec.needs_reference and m.data != "pairs"),
            (f"method={m.name}: method.loss={m.loss} needs data=pairs (rejected sequences), "
             f"got data={m.data}"),
        ),
        (
            m.nll_weight is None or m.nll_weight >= 0,
            f"method.nll_weight={m.nll_weight} must be >= 0 (or null: the weight is alpha)",
        ),
        (
            spec.fn is not None or nll_weight(cfg) != 0,
            f"method={m.name}: method.loss=none and an NLL weight of 0 leave nothing to train",
        ),
        (
            not (m.name == "dpo" and cfg.alpha != 0),
            (f"method=dpo is DPO without the NLL term but alpha={cfg.alpha}; "
             "use method=rpo for alpha>0 (or set alpha=0)"),
        ),
        (cfg.alpha >= 0, f"alpha={cfg.alpha} must be >= 0"),
    ]
