"""The ``hf`` sampler's decoding loop: batched sampling that stops computing finished rows.

``model.generate`` keeps every row of a batch in every step until the last row ends, runs
the prompt's prefill once per sample, and grows its KV cache by ``torch.cat`` at every
step (in a profile of the default run's sampling, 64 prompts x 4 samples, the copying was
the largest single cost once finished rows were dropped). This loop calls the same model
forward through transformers' ``Cache`` interface and differs in four ways:

* the prompt is prefilled once and its cache repeated for the ``n`` samples;
* the cache is preallocated at its final length (:class:`_PreallocatedLayer`) instead of
  growing by ``torch.cat`` at every step;
* rows that emitted EOS leave the batch (``Cache.batch_select_indices``), a quarter of
  the batch at a time;
* the next token is drawn with transformers' own temperature and top-p warpers from a
  ``torch.Generator`` seeded by the caller, so samples follow the distribution that
  ``generate(do_sample=True, temperature=t, top_p=p, top_k=0)`` draws from; greedy is
  the argmax, as in ``generate``.

It also returns each drawn token's log-prob under the raw logits (temperature 1, no top-p),
which ``generate`` needs a logits processor for. The measured speed-up and what else was
tried: docs/benchmarks.md (benchmarks/hf_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Decoded:
    """Per row (row ``p * n + j``: sample ``j`` of prompt ``p``): the generated ids, EOS
    included where one was drawn, and each one's log-prob under the model."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


@torch.inference_mode()
def decode(model, prompts: list[list[int]], n: int, temperature: float, top_p: float,
           max_new_tokens: int, eos_ids: list[int], pad_id: int, seed: int) -> Decoded:
    """Sample ``n`` continuations of each prompt (greedy when ``temperature == 0``)."""
    device = next(model.parameters()).device
    ids, prompt_mask = _left_pad(prompts, pad_id, device)
    width = ids.shape[1]
    cache = Cache(layers=[_PreallocatedLayer(width + max_new_tokens)
                          for _ in range(model.config.num_hidden_layers)])
    mask = torch.zeros((len(prompts), width + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    rows = logits.shape[0]
    choose = _chooser(temperature, top_p, torch.Generator(device).manual_seed(seed))
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    present = torch.arange(rows, device=device)  # the output row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # emitted EOS at an earlier step
    next_pos = prompt_mask.sum(-1).repeat_interleave(n)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for step in range(max_new_tokens):
        token = choose(logits)
        logprob = torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
        counts = ~done
        steps.append((present[counts], token[counts], logprob[counts]))
        done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        # Finished rows leave the batch once they are a quarter of it: each removal copies
        # the cache, so rows are removed in groups rather than one step at a time.
        if 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            token, mask, next_pos, present, done = (t[keep] for t in (token, mask, next_pos, present, done))
        mask[:, width + step] = 1
        logits = model(input_ids=token[:, None], attention_mask=mask[:, :width + step + 1],
                       position_ids=next_pos[:, None], past_key_values=cache, use_cache=True).logits[:, -1, :]
        next_pos = next_pos + 1
    return _collect(rows, steps)


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer in one buffer of the final length, for transformers' ``Cache``.

    ``DynamicLayer`` grows by ``torch.cat`` at every step, copying the whole cache: in the
    profile of this loop that copying was 46% of the time. Here each step writes its
    column in place and attention reads a view of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty(b, h, self.capacity, d)
            self._v = value_states.new_empty(b, h, self.capacity, d)
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, :self.length] = old[indices, :, :self.length]  # only the filled part
            setattr(self, name, new)
        self._views()


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every prompt ends at column `width`
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _chooser(temperature: float, top_p: float, generator: torch.Generator):
    """logits [rows, vocab] -> the next token of each row."""
    if temperature == 0:
        return lambda logits: torch.argmax(logits, dim=-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
              ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        # Inverse-CDF sampling: one uniform draw per row instead of torch.multinomial's one
        # exponential draw per vocabulary entry (10% of a sampling step in the profile).
        # right=True never lands on a token of probability 0 (one that top-p removed).
        cdf = torch.softmax(scores, dim=-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True)[:, 0]
        return torch.minimum(token, (cdf < cdf[:, -1:]).sum(-1))  # u == total: the last token with mass

    return sample


def _collect(rows: int, steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Decoded:
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    for present, tok, lp in steps:
        for r, t, v in zip(present.tolist(), tok.tolist(), lp.tolist()):
            tokens[r].append(t)
            logprobs[r].append(v)
    return Decoded(tokens, logprobs)
