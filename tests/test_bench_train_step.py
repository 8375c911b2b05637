"""The training-step benchmark's non-timing logic (benchmarks/bench_inputs.py,
benchmarks/train_step_worker.py): both trainers get identical token ids, the pairs have one
length, the FLOP count matches the model, and the first-step losses agree."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_inputs import build_inputs, corrupt, shared_prefix_flops, step_flops

from irpo.config import ModelConfig
from irpo.modeling import load_model
from irpo.tasks.arith import is_correct
from irpo.training.data import tokenize_examples

SMALL = ModelConfig(name="t", builtin="tiny", hidden_size=64, num_layers=2, num_heads=2,
                    intermediate_size=128, vocab_size=512, max_position_embeddings=256,
                    pretrain_seed=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("bench"), 16, model_cfg=SMALL, pool_size=4000)


def test_corrupt_gives_a_wrong_answer_of_the_same_shape():
    cot = " 2 + 2 = 4. 4 * 3 = 12. Final answer: 12"
    assert corrupt(cot) == " 2 + 2 = 4. 4 * 3 = 13. Final answer: 13"
    assert corrupt(" 9 + 9 = 19. Final answer: 19").endswith("= 10. Final answer: 10")
    with pytest.raises(ValueError, match="not an arithmetic gold CoT"):
        corrupt("no answer here")


def test_pairs_have_one_length_and_wrong_rejected(inputs):
    _, tok = load_model(inputs.model_dir)
    toks, truncated = tokenize_examples(tok, inputs.pairs, 10**6)
    assert truncated == 0 and len(toks) == 16
    assert {len(t.prompt) for t in toks} == {inputs.prompt_tokens}
    assert {len(t.chosen) for t in toks} | {len(t.rejected) for t in toks} == {inputs.response_tokens}
    for p in inputs.pairs:
        answer = p["chosen"].rsplit(": ", 1)[1]
        assert is_correct(p["chosen"], answer) and not is_correct(p["rejected"], answer)


def test_trl_sees_the_token_ids_we_train_on(inputs, tmp_path):
    from train_step_worker import make_trl_trainer

    _, tok = load_model(inputs.model_dir)
    ours, _ = tokenize_examples(tok, inputs.pairs, 10**6)
    args = argparse.Namespace(alpha=1.0, beta=0.1, lr=1e-4, batch_size=16, seed=0)
    trainer, _ = make_trl_trainer("trl", inputs.model_dir, inputs.pairs, args, tmp_path)
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours)
    for row, ex in zip(theirs, ours):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (ex.prompt, ex.chosen, ex.rejected)


def test_step_flops_count_every_weight_once(inputs):
    model, _ = load_model(inputs.model_dir)
    c = model.config
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size  # RMSNorm weights: no matmul
    weights = model.num_parameters() - norms  # the tied embedding is the LM head's matmul
    attention = 4 * c.num_hidden_layers * 10 * c.hidden_size
    assert step_flops(c, sequences=3, seq_len=10, passes=1) == 3 * 10 * (2 * weights + attention)
    assert step_flops(c, 3, 10, 3) == 3 * step_flops(c, 3, 10, 1)
    # Running the prompt once: P + 2R tokens per pair instead of 2(P + R), same attention context.
    two_rows = step_flops(c, 2 * 4, 30 + 20, 1)
    shared = shared_prefix_flops(c, 4, 30, 20, 1)
    assert shared < two_rows and shared == pytest.approx(two_rows * (30 + 40) / 100, rel=0.05)


def test_first_step_losses_agree_with_trl(inputs):
    """alpha=0: ln 2 on both sides (policy = reference); alpha>0: the same DPO + alpha*NLL."""
    from train_step_worker import first_step_loss

    for side in ("ours", "trl", "trl_pre"):
        assert first_step_loss(side, inputs.model_dir, inputs.pairs, 0.0) == pytest.approx(math.log(2), abs=1e-5)
    ours = first_step_loss("ours", inputs.model_dir, inputs.pairs, 2.0)
    theirs = first_step_loss("trl", inputs.model_dir, inputs.pairs, 2.0)
    assert ours > math.log(2) + 2.0  # the NLL of a random model is several nats per token
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_varlen_padding_counts_each_layout(inputs, tmp_path):
    """One batch of the mixed-length pairs: padding as each layout computes it, counted here."""
    from bench_inputs import read_pairs
    from train_step_varlen_inputs import padding

    from irpo.modeling import encode_prompt, encode_response

    pairs = read_pairs(inputs.model_dir.parent / "pairs_varlen.jsonl")
    _, tok = load_model(inputs.model_dir)
    p = [len(encode_prompt(tok, x["prompt"])) for x in pairs]
    c = [len(encode_response(tok, x["chosen"])) for x in pairs]
    r = [len(encode_response(tok, x["rejected"])) for x in pairs]
    useful = sum(p) + sum(c) + sum(r)
    shared = 1 - useful / (16 * max(p) + 32 * max(c + r))
    trl = 1 - (useful + sum(p)) / (32 * max(pp + max(cc, rr) for pp, cc, rr in zip(p, c, r)))
    got = padding(inputs.model_dir, pairs, batch_size=16)
    assert got["ours"] == 0.0 and got["ours_padded"] == pytest.approx(shared) and shared > 0.05
    assert got["trl"] == pytest.approx(trl) and trl > 0.05


def test_sampler_references_give_the_first_step_loss_of_a_reference_pass(inputs):
    """ours (references from sampler=hf's score) = ours_refpass = ours_padded on mixed lengths."""
    from bench_inputs import read_pairs
    from train_step_worker import first_step_loss

    from irpo.sampling.hf import HFSampler, HFSamplerConfig

    pairs = read_pairs(inputs.model_dir.parent / "pairs_varlen.jsonl")
    scorer = HFSampler(str(inputs.model_dir), HFSamplerConfig(name="hf", batch_size=8, device="cpu"))
    for side in ("chosen", "rejected"):
        values = scorer.score([p["prompt"] for p in pairs], [p[side] for p in pairs])
        for p, v in zip(pairs, values):
            p[f"{side}_ref_logprob"] = v
    losses = {side: first_step_loss(side, inputs.model_dir, pairs, 2.0)
              for side in ("ours", "ours_refpass", "ours_padded")}
    assert losses["ours"] == pytest.approx(losses["ours_refpass"], abs=1e-5)
    assert losses["ours_padded"] == pytest.approx(losses["ours_refpass"], abs=1e-5)
    # Wrong references move the loss: the sampler's are really used.
    shifted = [{**p, "chosen_ref_logprob": p["chosen_ref_logprob"] + 1.0} for p in pairs]
    with pytest.raises(Exception, match="reference log-prob check"):
        first_step_loss("ours", inputs.model_dir, shifted, 2.0)
    # ours_refpass and ours_padded drop them and compute their own.
    assert first_step_loss("ours_refpass", inputs.model_dir, shifted, 2.0) == pytest.approx(
        losses["ours_refpass"], abs=1e-5)
