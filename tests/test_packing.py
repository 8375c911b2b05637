"""Packed micro-batches (irpo.training.packing): one row, no padding, each pair's prompt once,
with the log-probs, loss and gradients of the padded computation on pairs of mixed lengths."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from irpo.config import Config, MethodConfig, ModelConfig
from irpo.tasks.arith import ArithConfig
from irpo.training.data import TokenizedExample
from irpo.training.logprobs import examples_logprobs
from irpo.training.packing import pack_examples, packed_logprobs, padding_fraction
from irpo.training.torch_trainer import TorchTrainerConfig, micro_loss

VOCAB = 97


def tiny_llama(dtype=torch.float32, kv_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256,
                      attn_implementation="sdpa", pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).train()


def mixed_pairs(n: int = 6, seed: int = 1) -> list[TokenizedExample]:
    """Prompts of 3..19 tokens, responses of 1..29: every batch would be padded."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedExample(ids(3, 20), ids(1, 30), ids(1, 30)) for _ in range(n)]


def one_at_a_time(model, examples) -> torch.Tensor:
    """Each response scored alone: prompt + response as one unpadded sequence, plain causal model."""
    out = []
    for side in ("chosen", "rejected"):
        for e in examples:
            resp = getattr(e, side)
            if resp is None:
                continue
            logits = model(input_ids=torch.tensor([e.prompt + resp])).logits[0].double()
            logp = logits.log_softmax(-1)[len(e.prompt) - 1 : -1].gather(-1, torch.tensor(resp)[:, None])
            out.append(logp.sum())
    return torch.stack(out)


def grads(model, values) -> list[torch.Tensor]:
    model.zero_grad()
    (values * torch.linspace(0.5, 1.5, len(values), dtype=values.dtype)).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_equals_each_sequence_alone_in_float64(kv_heads):
    """In float64 (except transformers' RMSNorm, which computes in float32): values to 1e-9,
    gradients to 1e-6 of the largest (the norm's float32 leaves ~1e-7; two padded rows vs one
    sequence differ as much)."""
    model = tiny_llama(torch.float64, kv_heads)
    pairs = mixed_pairs()
    expected = one_at_a_time(model, pairs)
    expected_grads = grads(model, expected)
    got, lengths = packed_logprobs(model, pairs)
    assert lengths.tolist() == [len(e.chosen) for e in pairs] + [len(e.rejected) for e in pairs]
    assert torch.allclose(got.double(), expected, atol=1e-9, rtol=0), (got - expected).abs().max()
    for g, e in zip(grads(model, got), expected_grads):
        assert torch.allclose(g, e, atol=1e-6 * e.abs().max().item(), rtol=0), (g - e).abs().max()
    singles = [TokenizedExample(e.prompt, e.chosen) for e in pairs]  # SFT rows, reference singles
    got, _ = packed_logprobs(model, singles)
    assert torch.allclose(got, one_at_a_time(model, singles), atol=1e-9, rtol=0)


def rpo_cfg() -> Config:
    return Config(dataset=ArithConfig(), model=ModelConfig(name="t", path="unused"),
                  method=MethodConfig(name="rpo"), trainer=TorchTrainerConfig(name="torch"),
                  beta=0.1, alpha=1.0)


@pytest.mark.parametrize("padded", ["shared_prefix", "two_rows"])
def test_loss_and_gradients_equal_the_padded_computation(padded):
    """fp32, as training runs: the micro-batch loss and every gradient within 1e-5."""
    model = tiny_llama()
    pairs = mixed_pairs(8, seed=2)
    assert padding_fraction(pairs, packed=False) > 0.2  # the padded batch really is padded
    refs = (torch.linspace(-60, -20, 8), torch.linspace(-70, -30, 8))
    results = {}
    for layout in ("packed", padded):
        model.zero_grad()
        out, logps, _ = micro_loss(model, pairs, refs, rpo_cfg(), pad_id=0, layout=layout)
        out.loss.backward()
        results[layout] = (out.loss.item(), logps.detach(), [p.grad.clone() for p in model.parameters()])
    (loss, logps, g), (loss_p, logps_p, g_p) = results["packed"], results[padded]
    assert abs(loss - loss_p) < 1e-5 and abs(loss) > 1  # a real loss, not a trivial one
    assert torch.allclose(logps, logps_p, atol=2e-4, rtol=0)  # sums of up to 58 fp32 log-probs
    assert max((a - b).abs().max().item() for a, b in zip(g, g_p)) < 1e-5
    assert max(a.abs().max().item() for a in g) > 1e-2


def test_gradient_checkpointing_keeps_the_packing():
    """Its recomputation in the backward replays the packing keyword: same gradients."""
    model = tiny_llama(torch.float64)
    pairs = mixed_pairs(4, seed=3)
    expected = grads(model, packed_logprobs(model, pairs)[0])
    model.gradient_checkpointing_enable()
    got = grads(model, packed_logprobs(model, pairs)[0])
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_layout_has_no_padding_and_per_sequence_positions():
    e = TokenizedExample([5, 6, 7], [8, 9], [10, 11, 12, 13])
    f = TokenizedExample([20, 21], [22], [23, 24])
    batch = pack_examples([e, f])
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 22, 23, 24]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 0, 1, 2, 2, 3]
    # The prompt's last position predicts both responses' first tokens.
    assert batch.keep.tolist() == [2, 3, 2, 5, 6, 7, 10, 10, 12]
    assert batch.targets.tolist() == [8, 9, 10, 11, 12, 13, 22, 23, 24]
    assert batch.rows.tolist() == [0, 0, 2, 2, 2, 2, 1, 3, 3]
    assert padding_fraction([e, f], packed=True) == 0.0
    # Padded: prompts to 3 (1 pad of 6), responses to 4 (2 + 0 + 3 + 2 pads of 16): 8 of 22.
    assert padding_fraction([e, f], packed=False) == pytest.approx(8 / 22)
    # Without rejected responses the padded batch is rows of prompt + response: 5, 3 -> 2 of 10.
    singles = [TokenizedExample(e.prompt, e.chosen), TokenizedExample(f.prompt, f.chosen)]
    assert padding_fraction(singles, packed=False) == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="every example has a rejected response or none"):
        pack_examples([e, TokenizedExample([1], [2])])


def test_other_layouts_still_selectable_and_unknown_one_named():
    model = tiny_llama()
    pairs = mixed_pairs(3)
    with torch.no_grad():
        a, _ = examples_logprobs(model, pairs, 0, layout="packed")
        b, _ = examples_logprobs(model, pairs, 0, layout="two_rows")
    assert torch.allclose(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="layout='rows' is not one of packed, shared_prefix, two_rows"):
        examples_logprobs(model, pairs, 0, layout="rows")
