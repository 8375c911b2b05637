"""docs/architecture.md's worked example, executed: adding a preference loss.

The doc adds a hinge loss in three steps: a per-example function in irpo/losses.py, a
``LOSSES`` registration, and a method YAML that names it. This test takes the same three steps
for real (the function is defined here and its source must appear verbatim in the doc;
the YAML is read out of the doc), composes the config as ``python -m irpo.main
method=hinge`` would, validates it, and checks the combined loss and its gradient, as the
trainers call it, against values derived by hand. The registration is done with
monkeypatch, so nothing leaks into other tests.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from irpo.config import ConfigError, compose, to_config
from irpo.config_rules import validate
from irpo.losses import LOSSES, PreferenceLoss, preference_loss
from irpo.method import needs_reference, nll_weight

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
REGISTRY_LINE = 'LOSSES.register("hinge", PreferenceLoss(hinge_loss, needs_reference=True))'


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-example hinge loss [B]: max(0, 1 − β[(πc − rc) − (πr − rr)]) (SLiC's hinge on DPO's margin)."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return torch.relu(1.0 - beta * margin)


def _doc_yaml() -> str:
    """The method YAML of the doc's example (the yaml block that names ``loss: hinge``)."""
    found = re.search(r"```yaml\n(# @package _global_\n(?:(?!```).)*?loss: hinge(?:(?!```).)*)```",
                      DOC.read_text(), re.DOTALL)
    assert found, f"{DOC}: no yaml block with '# @package _global_' and 'loss: hinge'"
    return found.group(1)


def _config(tmp_path: Path, *overrides: str):
    """The example's method YAML under a config search path, composed and typed."""
    (tmp_path / "method").mkdir(exist_ok=True)
    (tmp_path / "method" / "hinge.yaml").write_text(_doc_yaml())
    raw = compose(["method=hinge", f"hydra.searchpath=[file://{tmp_path}]", *overrides])
    return to_config(raw)


def test_doc_shows_the_code_this_test_runs():
    text = DOC.read_text()
    assert inspect.getsource(hinge_loss) in text
    assert REGISTRY_LINE in text


def test_an_unregistered_loss_is_refused_naming_the_field(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"method.loss='hinge' is not a known loss"):
        validate(cfg)


def test_new_loss_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(LOSSES, "hinge", PreferenceLoss(hinge_loss, needs_reference=True))
    cfg = _config(tmp_path, "beta=0.5", "alpha=0.5")
    validate(cfg)
    assert (cfg.method.name, cfg.method.loss, cfg.method.data) == ("hinge", "hinge", "pairs")
    assert needs_reference(cfg)  # the trainers pass rejected and reference log-probs
    assert nll_weight(cfg) == 0.5  # nll_weight null in the YAML: the top-level alpha

    # Summed sequence log-probs of three pairs, and the chosen responses' lengths.
    policy_chosen = torch.tensor([-10.0, -12.0, -8.0], requires_grad=True)
    policy_rejected = torch.tensor([-11.0, -9.0, -12.0])
    ref_chosen = torch.tensor([-10.5, -11.0, -10.0])
    ref_rejected = torch.tensor([-10.5, -10.0, -10.0])
    lengths = torch.tensor([4, 6, 8])
    # The call irpo.training.torch_trainer.micro_loss makes.
    out = preference_loss(policy_chosen, lengths, cfg.beta, nll_weight(cfg), loss=cfg.method.loss,
                          policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                          ref_rejected=ref_rejected)

    # By hand: margins (πc − rc) − (πr − rr) = 1, −2, 4; hinge max(0, 1 − 0.5·margin) = 0.5, 2, 0
    # (the third pair is past the margin: clipped); mean 2.5/3. NLL −πc/|w| = 2.5, 2, 1; mean
    # 5.5/3. Loss = 2.5/3 + 0.5 · 5.5/3 = 1.75.
    assert out.dpo.item() == pytest.approx(2.5 / 3)
    assert out.nll.item() == pytest.approx(5.5 / 3)
    assert out.loss.item() == pytest.approx(1.75)
    # Rewards β·(π − r): chosen 0.25, −0.5, 1; rejected −0.25, 0.5, −1 -> accuracy 2/3.
    assert out.reward_accuracy.item() == pytest.approx(2 / 3)

    # Gradient w.r.t. πc: −β/3 from an active hinge, 0 from a clipped one, −α/(3·|w|) from NLL.
    out.loss.backward()
    expected = [-0.5 / 3 - 0.5 / 12, -0.5 / 3 - 0.5 / 18, -0.5 / 24]
    assert policy_chosen.grad.tolist() == pytest.approx(expected)
