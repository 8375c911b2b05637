"""Reference log-probs from the sampler (irpo.training.reference) in the torch trainer.

On the small random Llama of tests/test_trainer.py (24 pairs, batch 8, 3 steps; seconds):
given references equal to the recomputed ones leave the loss curve as it is, the reference
forward runs only for the responses that lack one (calls counted), a deliberately wrong one
moves the first step's DPO term by the hand-derived amount, and the agreement check stops a
wrong one. The DeepSpeed trainer runs the same function (tests/test_trainer_deepspeed.py);
the vLLM sampler's own values are checked in tests/test_sampling_vllm.py.

Run: .venv/bin/python -m pytest tests/test_reference.py -x -q
"""

from __future__ import annotations

import math

import pytest
from test_config import load
from test_trainer import make_cfg, run_train, tiny_ckpt  # noqa: F401  (tiny_ckpt: a fixture)

from irpo.config import ConfigError
from irpo.modeling import context_length, load_model
from irpo.training import torch_trainer
from irpo.training.data import tokenize_examples
from irpo.training.logprobs import reference_logprobs
from irpo.training.reference import ReferenceMismatch
from irpo.training.torch_trainer import batch_order

BETA = 0.1  # make_cfg's
CURVE_TOL = 1e-6


def recomputed_refs(path, pairs) -> list[tuple[float, float]]:
    """(chosen, rejected) reference log-probs as the torch trainer computes them (batches of 8)."""
    model, tok = load_model(path)
    toks, _ = tokenize_examples(tok, pairs, context_length(model))
    chosen, rejected = reference_logprobs(model, toks, tok.pad_token_id, 8)
    return list(zip(chosen.tolist(), rejected.tolist()))


def with_refs(pairs, refs, known) -> list[dict]:
    """``pairs`` with the sampler's log-probs where ``known(i, side)`` (side 0: chosen), else null."""
    return [{**p, "chosen_ref_logprob": refs[i][0] if known(i, 0) else None,
             "rejected_ref_logprob": refs[i][1] if known(i, 1) else None}
            for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def baseline(tiny_ckpt, tmp_path_factory):  # noqa: F811
    """The torch trainer without sampler log-probs, and the references it computed."""
    path, pairs = tiny_ckpt
    info, logged = run_train(make_cfg(), path, pairs, tmp_path_factory.mktemp("base"))
    return info, logged, recomputed_refs(path, pairs)


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Responses scored by each call of the trainer's reference pass."""
    calls: list[int] = []
    real = torch_trainer.reference_logprobs

    def counting(model, examples, *args, **kwargs):
        calls.append(len(examples) * (1 if examples[0].rejected is None else 2))
        return real(model, examples, *args, **kwargs)

    monkeypatch.setattr(torch_trainer, "reference_logprobs", counting)
    return calls


def assert_same_curve(logged, ref_logged, logps_tol=CURVE_TOL):
    """Every metric of every step within CURVE_TOL; ``logps/*`` (sums over ~270 tokens, in
    float32 to ~3e-5) within ``logps_tol``; the reward accuracy where the margins are not
    all zero (at the first step they are, up to rounding, which differs between CPUs)."""
    assert [s for s, _ in logged] == [s for s, _ in ref_logged]
    for (_, a), (_, b) in zip(logged, ref_logged):
        assert a.keys() == b.keys()
        for k in a:
            if k == "rewards/accuracy" and abs(b["rewards/margin"]) < 1e-5:
                continue  # policy = reference: every margin is ~0, and its sign is rounding
            tol = logps_tol if k.startswith("logps/") else CURVE_TOL
            assert a[k] == pytest.approx(b[k], abs=tol), k


def test_all_known_no_reference_forward_same_curve(tiny_ckpt, baseline, forwards, tmp_path):  # noqa: F811
    path, pairs = tiny_ckpt
    base_info, base_logged, refs = baseline
    assert base_info["ref_rows_from_sampler"] == 0 and base_info["ref_rows_computed"] == 48
    given = with_refs(pairs, refs, lambda i, side: True)
    info, logged = run_train(make_cfg(ref_check_pairs=0), path, given, tmp_path / "a")
    assert forwards == []  # no reference forward at all
    assert (info["ref_rows_from_sampler"], info["ref_rows_computed"]) == (48, 0)
    assert info["ref_check_pairs"] == 0 and info["ref_logprob_check_max_abs_diff"] is None
    assert_same_curve(logged, base_logged)
    # Switched off: the sampler's values are ignored and all 48 responses recomputed.
    info, logged = run_train(make_cfg(sampler_ref_logprobs=False), path, given, tmp_path / "b")
    assert forwards == [48] and (info["ref_rows_from_sampler"], info["ref_rows_computed"]) == (0, 48)
    assert_same_curve(logged, base_logged)


def test_forward_only_for_unknown_responses(tiny_ckpt, baseline, forwards, tmp_path):  # noqa: F811
    """Pairs i % 3 == 0 know nothing, == 1 only the rejected (a gold CoT winner), == 2 both."""
    path, pairs = tiny_ckpt
    _, base_logged, refs = baseline
    given = with_refs(pairs, refs, lambda i, side: i % 3 == 2 or (i % 3 == 1 and side == 1))
    info, logged = run_train(make_cfg(ref_check_pairs=8), path, given, tmp_path)
    # 8 unknown pairs (16 responses), 8 gold-like winners alone, then the check's 8 pairs.
    assert forwards == [16, 8, 16]
    assert (info["ref_rows"], info["ref_rows_from_sampler"], info["ref_rows_computed"]) == (48, 24, 24)
    assert info["ref_check_pairs"] == 8 and info["ref_logprob_check_max_abs_diff"] < 1e-4
    # The unknown ones are scored in other batches (a single row without the shared prompt),
    # so log-prob sums agree to float32 rounding only; the losses to 1e-6.
    assert_same_curve(logged, base_logged, logps_tol=1e-4)


def test_wrong_reference_moves_first_step_dpo_by_the_derived_amount(tiny_ckpt, baseline, tmp_path):  # noqa: F811
    """At step 1 policy = reference, so every pair's DPO margin is 0 and its loss ln 2. A
    rejected reference too high by delta makes that pair's margin beta * delta, its loss
    softplus(-beta * delta); the step's DPO term (a mean over the 8 pairs) moves by
    (softplus(-beta * delta) - ln 2) / 8, and the mean reward margin by beta * delta / 8."""
    path, pairs = tiny_ckpt
    _, base_logged, refs = baseline
    first = batch_order(len(pairs), 3, 8, seed=0)[0]
    delta = 5.0
    for j, moves in ((first[3], True), (next(i for i in range(24) if i not in first), False)):
        wrong = [list(r) for r in refs]
        wrong[j][1] += delta
        given = with_refs(pairs, wrong, lambda i, side: True)
        _, logged = run_train(make_cfg(ref_check_pairs=0), path, given, tmp_path / str(j))
        step1, base1 = logged[0][1], base_logged[0][1]
        expected = (math.log1p(math.exp(-BETA * delta)) - math.log(2)) / 8 if moves else 0.0
        assert step1["train/dpo"] - base1["train/dpo"] == pytest.approx(expected, abs=1e-6)
        assert step1["rewards/margin"] - base1["rewards/margin"] == pytest.approx(
            BETA * delta / 8 if moves else 0.0, abs=1e-6)
        assert step1["train/nll"] == pytest.approx(base1["train/nll"], abs=1e-7)


def test_agreement_check_flags_a_wrong_reference(tiny_ckpt, baseline, tmp_path):  # noqa: F811
    path, pairs = tiny_ckpt
    _, _, refs = baseline
    off = [list(r) for r in refs]
    off[5][1] += 0.5
    given = with_refs(pairs, off, lambda i, side: True)
    with pytest.raises(ReferenceMismatch, match=r"pair 5 \(id='5'\), rejected response: the sampler "
                                                r"gave .* \(\|diff\| 0\.5 > trainer\.ref_check_tolerance"):
        run_train(make_cfg(ref_check_pairs=24), path, given, tmp_path / "a")
    # Under the tolerance it trains, and the stage summary reports the difference.
    off[5][1] = refs[5][1] + 0.004
    given = with_refs(pairs, off, lambda i, side: True)
    info, _ = run_train(make_cfg(ref_check_pairs=24), path, given, tmp_path / "b")
    assert info["ref_logprob_check_max_abs_diff"] == pytest.approx(0.004, abs=1e-4)


def test_cut_responses_lose_their_sampler_logprob(tiny_ckpt):  # noqa: F811
    """A response cut to the context is not the one the sampler scored."""
    path, pairs = tiny_ckpt
    _, tok = load_model(path)
    pair = {**pairs[0], "chosen_ref_logprob": -1.0, "rejected_ref_logprob": -2.0}
    (whole,), cut = tokenize_examples(tok, [pair], 256)
    assert cut == 0 and (whole.chosen_ref, whole.rejected_ref) == (-1.0, -2.0)
    room = len(whole.prompt) + len(whole.chosen) - 1  # the chosen (shorter) loses its last token
    assert len(whole.rejected) > len(whole.chosen)
    (short,), cut = tokenize_examples(tok, [pair], room)
    assert cut == 2 and (short.chosen_ref, short.rejected_ref) == (None, None)
    (plain,), _ = tokenize_examples(tok, [pairs[0]], 256)
    assert (plain.chosen_ref, plain.rejected_ref) == (None, None)


def test_check_settings_are_validated():
    cfg = load("trainer.ref_check_pairs=3")
    assert cfg.trainer.sampler_ref_logprobs and cfg.trainer.ref_check_pairs == 3
    with pytest.raises(ConfigError, match="trainer.ref_check_pairs=-1 must be >= 0"):
        load("trainer.ref_check_pairs=-1")
    with pytest.raises(ConfigError, match="trainer.ref_check_tolerance=0.0 must be > 0"):
        load("trainer=deepspeed", "trainer.ref_check_tolerance=0")


def test_a_response_in_several_pairs_is_scored_once(tiny_ckpt):  # noqa: F811
    """A gold-like winner paired with three losers, its reference unknown: one forward row
    serves its three pairs, with the value a forward of each row would give."""
    import torch

    from irpo.config import TrainerConfig
    from irpo.training.data import TokenizedExample
    from irpo.training.reference import stage_reference

    path, pairs = tiny_ckpt
    model, tok = load_model(path)
    dup = [{**p, "rejected": p["rejected"] + tail} for p in pairs[:4] for tail in ("", " 1", " 2")]
    given = with_refs(dup, [(0.0, -5.0)] * len(dup), lambda i, side: side == 1)
    toks, _ = tokenize_examples(tok, given, context_length(model))
    scored: list[int] = []

    def score(part):
        scored.append(len(part))
        return reference_logprobs(model, part, tok.pad_token_id, 8, layout="shared_prefix")

    tcfg = TrainerConfig(name="t", ref_check_pairs=0)
    (chosen, rejected), info = stage_reference(toks, score, tcfg, [p["id"] for p in dup], 0)
    assert scored == [4]  # 4 distinct winners for 12 rows
    each, _ = reference_logprobs(model, [TokenizedExample(t.prompt, t.chosen) for t in toks],
                                 tok.pad_token_id, 8)
    assert torch.allclose(chosen, each, atol=1e-4) and len(set(chosen.tolist())) == 4
    assert rejected.tolist() == [-5.0] * 12
    assert (info["ref_rows_computed"], info["ref_forward_rows"], info["ref_rows_from_sampler"]) == (12, 4, 12)
