"""Running a pair's prompt once (KV cache) gives the log-probs and gradients of the
two-row forward, on pairs of mixed prompt and response lengths."""

from __future__ import annotations

import pytest
import torch

from irpo.builtin_model import build_model, build_tokenizer
from irpo.config import ModelConfig
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.training.data import pair_batch, tokenize_examples
from irpo.training.logprobs import batch_logprobs
from irpo.training.shared_prefix import pair_logprobs, shared_prefix_batch


@pytest.fixture(scope="module")
def model_and_pairs():
    examples = ArithTask(ArithConfig(pretrain_size=200, train_size=8, valid_size=2,
                                     test_size=2)).load_split("pretrain")
    tok = build_tokenizer([e.prompt + e.gold_cot for e in examples], 300)
    mcfg = ModelConfig(name="t", builtin="tiny", hidden_size=64, num_heads=2, num_layers=2,
                       intermediate_size=128, max_position_embeddings=256, pretrain_seed=0)
    model = build_model(mcfg, tok)
    # Rejected responses shorter and longer than the chosen ones, prompts of several lengths.
    pairs = [{"prompt": e.prompt, "chosen": e.gold_cot,
              "rejected": e.gold_cot[: 5 + 7 * i] if i % 2 else e.gold_cot + " Or maybe 3."}
             for i, e in enumerate(examples[:6])]
    toks, _ = tokenize_examples(tok, pairs, 256)
    assert len({len(t.prompt) for t in toks}) > 1 and len({len(t.rejected) for t in toks}) > 1
    return model, tok, toks


def _grads(model, logps):
    model.zero_grad()
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_matches_two_row_forward_values_and_gradients(model_and_pairs):
    model, tok, toks = model_and_pairs
    model.train()
    ref, ref_len = batch_logprobs(model, pair_batch(toks, tok.pad_token_id))
    ref_grads = _grads(model, ref)
    got, got_len = pair_logprobs(model, toks, tok.pad_token_id)
    got_grads = _grads(model, got)
    assert torch.equal(got_len, ref_len)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()
    for g, r in zip(got_grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_batch_layout(model_and_pairs):
    _, tok, toks = model_and_pairs
    batch = shared_prefix_batch(toks[:2], tok.pad_token_id)
    assert batch["response_ids"].shape[0] == 4  # c0, r0, c1, r1
    assert batch["response_ids"][1, : len(toks[0].rejected)].tolist() == toks[0].rejected
    assert batch["labels"][2, 1 : len(toks[1].chosen) + 1].tolist() == toks[1].chosen
    assert (batch["labels"][:, 0] == -100).all()  # the prompt's last position has no label
    assert batch["prompt_lengths"].tolist() == [len(t.prompt) for t in toks[:2]]


def test_falls_back_under_gradient_checkpointing_and_without_rejected(model_and_pairs):
    model, tok, toks = model_and_pairs
    model.eval()
    with torch.no_grad():
        ref, _ = batch_logprobs(model, pair_batch(toks, tok.pad_token_id))
        model.gradient_checkpointing_enable()
        try:
            got, _ = pair_logprobs(model, toks, tok.pad_token_id)
        finally:
            model.gradient_checkpointing_disable()
        assert torch.equal(got, ref)  # the two-row path itself
        chosen_only = [type(t)(t.prompt, t.chosen) for t in toks]
        got, _ = pair_logprobs(model, chosen_only, tok.pad_token_id)
        assert torch.allclose(got, ref[: len(toks)], rtol=1e-6, atol=1e-5)
