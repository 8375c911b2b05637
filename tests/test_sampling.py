"""The hf sampler: ordering, batching invariance, seeding, stop/length bookkeeping, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from irpo.builtin_model import build_model, build_tokenizer
from irpo.config import ModelConfig, SamplerConfig
from irpo.modeling import encode_prompt, encode_response, load_model
from irpo.sampling import Generation, build_sampler
from irpo.sampling.hf import HFSampler, HFSamplerConfig
from irpo.tasks.arith import ArithConfig, build_arith

TINY = ModelConfig(
    name="tiny", builtin="tiny", hidden_size=64, num_heads=2, num_layers=2, intermediate_size=128,
    vocab_size=320, max_position_embeddings=512, pretrain_seed=0,
)
DATA = ArithConfig(pretrain_size=200, train_size=8, valid_size=8, test_size=8)
CFG = SamplerConfig(name="hf", batch_size=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained Llama with large random weights, saved as an HF checkpoint.

    Untrained on purpose: a briefly trained tiny model answers every prompt
    alike, which would let ordering bugs pass. Weights 10x the usual init give
    prompt-dependent outputs with logits far apart, so greedy decoding has no
    near-ties that float noise could flip.
    """
    examples = build_arith(DATA).load_split("pretrain")
    tok = build_tokenizer([e.prompt + e.gold_cot for e in examples], TINY.vocab_size)
    model = build_model(TINY, tok)
    torch.manual_seed(0)
    for param in model.parameters():
        if param.dim() == 2:  # embeddings and projections; norms stay at 1
            torch.nn.init.normal_(param, std=0.2)
    path = tmp_path_factory.mktemp("random-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampler(model_dir):
    s = build_sampler(CFG, str(model_dir))
    yield s
    s.close()


@pytest.fixture(scope="module")
def prompts():
    # Different lengths, so sorting by length really permutes them.
    return [e.prompt for e in build_arith(DATA).load_split("train")]


def test_build_sampler(sampler):
    assert isinstance(sampler, HFSampler)
    with pytest.raises(ValueError, match="sampler.name='nope'"):
        build_sampler(SamplerConfig(name="nope"), "x")


def test_greedy_independent_of_batching(sampler, prompts):
    batched = sampler.generate(prompts, 1, 0.0, 24, seed=0)
    sampler.cfg = dataclasses.replace(CFG, batch_size=1)
    try:
        single = sampler.generate(prompts, 1, 0.0, 24, seed=0)
        reversed_ = sampler.generate(prompts[::-1], 1, 0.0, 24, seed=5)
    finally:
        sampler.cfg = CFG
    assert [g[0] for g in batched] == [g[0] for g in single]  # padding changes nothing
    assert [g[0] for g in batched] == [g[0] for g in reversed_[::-1]]  # results follow the input order
    assert len({g[0].text for g in batched}) > 1  # the prompts really get different answers


def test_n_samples_grouped_by_prompt(sampler, prompts):
    greedy = sampler.generate(prompts, 1, 0.0, 16, seed=0)
    # A near-zero temperature is greedy in effect: sample j of prompt i must equal
    # prompt i's greedy answer, which checks that samples are grouped per prompt.
    cold = sampler.generate(prompts, 3, 1e-4, 16, seed=0)
    assert len(cold) == len(prompts) and all(len(gens) == 3 for gens in cold)
    for gens, g in zip(cold, greedy):
        assert gens == [g[0]] * 3


def test_seeding(sampler, prompts):
    a = sampler.generate(prompts, 4, 1.0, 16, seed=1)
    b = sampler.generate(prompts, 4, 1.0, 16, seed=1)
    c = sampler.generate(prompts, 4, 1.0, 16, seed=2)
    assert a == b
    assert a != c
    # Different samples of one prompt differ (a barely trained model is far from deterministic).
    assert len({g.text for g in a[0]}) > 1


def test_lengths_and_finished(sampler, prompts):
    eos = sampler.tokenizer.eos_token_id
    for max_new in (1, 7, 40):
        for gens in sampler.generate(prompts, 2, 1.0, max_new, seed=3):
            for g in gens:
                assert 1 <= g.num_tokens <= max_new
                # Unfinished means it ran out of budget; finished means it emitted EOS.
                assert g.finished or g.num_tokens == max_new
                assert "</s>" not in g.text and "<pad>" not in g.text
    # Bookkeeping on a known token row: EOS ends it, the padding after is not counted.
    tok = sampler.tokenizer
    ids = tok(" 1 + 2 = 3.", add_special_tokens=False)["input_ids"]
    assert sampler._decode(ids + [eos, tok.pad_token_id]) == Generation(" 1 + 2 = 3.", len(ids) + 1, True)
    assert sampler._decode(ids) == Generation(" 1 + 2 = 3.", len(ids), False)


def test_argument_errors(sampler, prompts):
    with pytest.raises(ValueError, match="greedy"):
        sampler.generate(prompts, 2, 0.0, 8, seed=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate(prompts, 1, 1.0, 0, seed=0)
    too_long = prompts[:1] + ["word " * 400]
    with pytest.raises(ValueError, match="prompt 1 has .* context of 512"):
        sampler.generate(too_long, 1, 0.0, 8, seed=0)
    with pytest.raises(ValueError, match="prompt 0 has"):
        sampler.generate(prompts[:1], 1, 0.0, 510, seed=0)


def teacher_forced(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Summed log-prob of the response ids after the prompt's: one unpadded forward, plain log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].double()
    return float(logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
                 .gather(-1, torch.tensor(response_ids)[:, None]).sum())


@pytest.fixture(scope="module")
def logprob_sampler(model_dir):
    s = build_sampler(HFSamplerConfig(name="hf", batch_size=8, device="cpu", return_logprobs=True),
                      str(model_dir))
    yield s
    s.close()


def test_sampled_logprobs_equal_teacher_forcing_untempered(logprob_sampler, prompts):
    """Each sampled token's log-prob as hf records it is the model's own (temperature 1), as an
    unpadded forward gives it, though the batch was left padded and sampled at temperature 0.7."""
    s = logprob_sampler
    model, _ = load_model(s.model.name_or_path)
    batch = [encode_prompt(s.tokenizer, p) for p in prompts]
    assert len({len(ids) for ids in batch}) > 1  # prompts of several lengths: left padding
    rows, steps = s._sample_ids(batch, 2, 0.7, 12, seed=0)
    worst, tempered_gap = 0.0, 0.0
    for i, (row, lp) in enumerate(zip(rows, steps)):
        prompt = batch[i // 2]
        end = next((k + 1 for k, t in enumerate(row) if t in s.eos_ids), len(row))
        expected = teacher_forced(model, prompt, row[:end])
        worst = max(worst, abs(sum(lp[:end]) - expected))
        with torch.no_grad():  # the same tokens under the tempered distribution
            logits = model(input_ids=torch.tensor([prompt + row[:end]])).logits[0, len(prompt) - 1 : -1]
        tempered = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(row[:end])[:, None]).sum()
        tempered_gap = max(tempered_gap, abs(sum(lp[:end]) - float(tempered)))
    assert worst < 1e-4, worst
    assert tempered_gap > 0.1


def test_decode_keeps_the_logprob_of_exactly_the_trained_ids(logprob_sampler):
    s, eos = logprob_sampler, logprob_sampler.tokenizer.eos_token_id
    ids = s.tokenizer(" 1 + 2 = 3.", add_special_tokens=False)["input_ids"]
    steps = [-0.5] * len(ids) + [-0.25, -9.0]  # the last one: padding after EOS, left out
    assert s._decode(ids + [eos, eos], steps).logprob == pytest.approx(-0.5 * len(ids) - 0.25)
    assert s._decode(ids, steps).logprob is None  # unfinished: the trainer's EOS was never sampled


def test_score_equals_teacher_forcing(logprob_sampler, prompts):
    s = logprob_sampler
    model, _ = load_model(s.model.name_or_path)
    responses = [" 1 + 2 = 3. Final answer: 3", " 40 - 2 = 38. Final answer: 38"] * 4
    values = s.score(prompts[:8], responses)
    for p, r, v in zip(prompts, responses, values):
        expected = teacher_forced(model, encode_prompt(s.tokenizer, p), encode_response(s.tokenizer, r))
        assert v == pytest.approx(expected, abs=1e-4)
    assert s.score(prompts[:1], ["word " * 600]) == [None]  # past the context: the trainer cuts it
    assert s.model.config._attn_implementation == "sdpa"  # generate() keeps its attention


def test_no_logprobs_unless_asked(sampler, prompts):
    assert all(g.logprob is None for gens in sampler.generate(prompts, 2, 1.0, 40, seed=0) for g in gens)
