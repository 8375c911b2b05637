"""The hf sampler's decoding loop against transformers' ``generate`` and against the
sampling distribution written out here: greedy tokens equal, sampled tokens drawn from
softmax(logits / T) restricted to the top-p nucleus, log-probs of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from irpo.builtin_model import shipped_model_dir
from irpo.modeling import encode_prompt, eos_token_ids, load_model
from irpo.sampling.decode import decode
from irpo.tasks.arith import ArithConfig, build_arith


@pytest.fixture(scope="module")
def m0():
    model, tok = load_model(shipped_model_dir("tiny"))
    return model, tok, eos_token_ids(model, tok)


@pytest.fixture(scope="module")
def prompts(m0):
    _, tok, _ = m0
    data = ArithConfig(train_size=0, valid_size=0, test_size=24)
    return [encode_prompt(tok, e.prompt) for e in build_arith(data).load_split("test")]


def plain_generate(model, tok, eos, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ``generate`` on one unpadded prompt: the reference."""
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_generate(m0, prompts):
    model, tok, eos = m0
    got = decode(model, prompts, 1, 0.0, 1.0, 96, eos, tok.pad_token_id, seed=0)
    for i, ids in enumerate(prompts):
        want = plain_generate(model, tok, eos, ids, 96)
        if want and want[-1] in eos:
            pass
        else:  # generate pads nothing on a single row; an unfinished row is max_new_tokens long
            assert len(want) == 96
        assert got.tokens[i] == want, i


def test_rows_are_prompt_major_and_stop_at_eos(m0, prompts):
    model, tok, eos = m0
    out = decode(model, prompts[:6], 3, 1.0, 1.0, 40, eos, tok.pad_token_id, seed=1)
    assert len(out.tokens) == 18
    for row, lps in zip(out.tokens, out.logprobs):
        assert 1 <= len(row) <= 40 and len(lps) == len(row)
        assert all(t not in eos for t in row[:-1])  # nothing after an EOS
        assert all(v <= 0 for v in lps)
    again = decode(model, prompts[:6], 3, 1.0, 1.0, 40, eos, tok.pad_token_id, seed=1)
    assert again.tokens == out.tokens  # seeded
    # Samples of one prompt differ from each other (the cache really was repeated per sample).
    assert len({tuple(r) for r in out.tokens[:3]}) > 1 or len({tuple(r) for r in out.tokens[3:6]}) > 1


def test_logprobs_are_those_of_the_raw_logits(m0, prompts):
    model, tok, eos = m0
    out = decode(model, prompts[:4], 2, 0.7, 0.9, 30, eos, tok.pad_token_id, seed=3)
    for r, row in enumerate(out.tokens):
        ids = torch.tensor([prompts[r // 2] + row])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(prompts[r // 2]) - 1
        want = [logp[start + k, t].item() for k, t in enumerate(row)]
        assert max(abs(a - b) for a, b in zip(out.logprobs[r], want)) < 1e-4


def test_first_tokens_follow_the_tempered_nucleus(m0, prompts):
    """4000 one-token samples at M0's least certain step of a greedy answer, against the
    distribution computed here: the top-p nucleus of softmax(logits / T); a chi-square
    bound far beyond chance."""
    model, tok, eos = m0
    temperature, top_p, draws = 0.8, 0.95, 4000
    answer = plain_generate(model, tok, eos, prompts[0], 96)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompts[0] + answer])).logits[0].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)[len(prompts[0]) - 1:]
    prompt = prompts[0] + answer[: int(entropy.argmax())]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    order = torch.argsort(probs, descending=True)
    nucleus, mass = [], 0.0
    for t in order.tolist():  # smallest set whose mass reaches top_p
        nucleus.append(t)
        mass += probs[t].item()
        if mass >= top_p:
            break
    expected = {t: probs[t].item() / mass for t in nucleus}
    out = decode(model, [prompt], draws, temperature, top_p, 1, eos, tok.pad_token_id, seed=7)
    counts: dict[int, int] = {}
    for row in out.tokens:
        counts[row[0]] = counts.get(row[0], 0) + 1
    assert set(counts) <= set(expected)  # nothing outside the nucleus
    assert len(expected) >= 2  # a real choice
    chi2 = sum((counts.get(t, 0) - draws * p) ** 2 / (draws * p) for t, p in expected.items())
    dof = len(expected) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # mean dof, sd sqrt(2 dof)
