"""The ``hf`` sampler: transformers ``generate`` in this process (CPU, tests, small models).

Built by :func:`irpo.sampling.build_sampler` for ``sampler=hf``::

    sampler = HFSampler(model_path, HFSamplerConfig(name="hf", batch_size=64), dtype="float32")
    outs = sampler.generate(prompts, n=8, temperature=1.0, max_new_tokens=96, seed=0)

Prompts are sorted by length and sent ``cfg.batch_size`` at a time (``greedy_batch_size``
for greedy decoding), left padded, each
expanded to ``n`` samples (irpo.sampling.decode: the model's forward with transformers'
KV cache and sampling warpers, finished rows dropped from the batch); results come back in
the original order. Sampling is pure temperature/top-p sampling from the model (the
checkpoint's own generation defaults such as top-k or repetition penalties are
deliberately not applied: IRPO samples from the model itself). Batch ``b`` is seeded with
``seed + first_index + b``, so a call is reproducible for a given seed, prompt list and
batch size (``first_index``: where a chunk of a stage's prompts starts, irpo.chunks; 0 for
a whole list, whose seeds are then ``seed + b``).

Log-probs (``return_logprobs``, on by default), as ``sampler=vllm`` gives them:
``Generation.logprob`` is the summed log-prob of the sampled tokens under the model itself
(temperature 1, no top-p: the logits before any warper), read off the logits that decoding
computes anyway, so the next iteration's trainer needs no reference pass. None where the
trainer would score other ids (the response hit max_new_tokens, or re-encoding the text
gives other ids). The batch is left padded; the model masks the pads and takes positions
from the mask, so the values are those of an unpadded forward up to float rounding: within
1e-4 of the trainer's teacher-forced forward on the tests' pairs, far inside
``trainer.ref_check_tolerance`` (0.01), which checks a sample of them every stage.
:meth:`HFSampler.score` scores responses it did not sample (the driver's gold CoT winners)
with the trainer's packed forward (irpo.training.packing).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from irpo.config import SAMPLERS, SamplerConfig
from irpo.modeling import (
    context_length,
    encode_prompt,
    encode_response,
    eos_token_ids,
    load_model,
    resolve_device,
)
from irpo.sampling import Generation

log = logging.getLogger(__name__)


@SAMPLERS.backend("hf", builder="irpo.sampling.hf:HFSampler")
@dataclass
class HFSamplerConfig(SamplerConfig):
    """``sampler=hf``: transformers ``generate`` in the driver (this module's HFSampler)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1
    # Prompts per call of greedy decoding: one row each, so that a greedy batch has as many
    # rows as a sampled one of batch_size x 4 (on the CPU a step of 64 rows is mostly
    # per-step overhead; benchmarks/hf_decode.py).
    greedy_batch_size: int = 256
    # Generation.logprob (the model's own log-prob of each sample) and score() for gold CoT
    # winners: the next stage's DPO reference without a reference pass (irpo/training/reference.py).
    return_logprobs: bool = True


class HFSampler:
    def __init__(self, model_path: str, cfg: Any, dtype: str = "float32"):
        self.cfg = cfg
        # ``sampler.device``: auto puts the model on the GPU if there is one.
        self.device = resolve_device(getattr(cfg, "device", "auto"), "sampler.device")
        self.model, self.tokenizer = load_model(model_path, dtype=dtype, device=self.device)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.context = context_length(self.model)

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int, desc: str = "sampling", first_index: int = 0) -> list[list[Generation]]:
        if temperature > 0:
            bs, field = self.cfg.batch_size, "sampler.batch_size"
        else:  # a config without the field (the base SamplerConfig) batches greedy by batch_size
            bs, field = getattr(self.cfg, "greedy_batch_size", self.cfg.batch_size), "sampler.greedy_batch_size"
        _check_args(n, temperature, max_new_tokens, bs, field)
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        self._check_lengths(encoded, max_new_tokens)
        # Similar lengths together: less padding, fewer wasted positions per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[list[Generation] | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, mininterval=1.0) as bar:
            for b, start in enumerate(range(0, len(order), bs)):
                index = order[start : start + bs]
                batch = self._generate_batch(
                    [encoded[i] for i in index], n, temperature, max_new_tokens,
                    seed + first_index + b)
                for i, gens in zip(index, batch):
                    results[i] = gens
                bar.update(len(index))
        return results  # type: ignore[return-value]

    def _check_lengths(self, encoded: list[list[int]], max_new_tokens: int) -> None:
        if self.context is None:
            return
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.context:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                    f"exceeds the model's context of {self.context} positions"
                )

    def _generate_batch(self, batch: list[list[int]], n: int, temperature: float,
                        max_new_tokens: int, seed: int) -> list[list[Generation]]:
        rows, steps = self._sample_ids(batch, n, temperature, max_new_tokens, seed)
        gens = [self._decode(row, steps[i] if steps else None) for i, row in enumerate(rows)]
        return [gens[p * n : (p + 1) * n] for p in range(len(batch))]

    def _sample_ids(self, batch: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                    seed: int) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generated ids per row (row p*n + j: sample j of prompt p; EOS last where drawn) and,
        with ``return_logprobs``, each token's log-prob under the model."""
        from irpo.sampling.decode import decode  # imports transformers; composing a config must not

        out = decode(self.model, batch, n, temperature, self.cfg.top_p, max_new_tokens,
                     self.eos_ids, self.tokenizer.pad_token_id, seed)
        return out.tokens, out.logprobs if self.return_logprobs else None

    @property
    def return_logprobs(self) -> bool:
        return bool(getattr(self.cfg, "return_logprobs", False))

    @classmethod
    def scores(cls, sampler_cfg: Any) -> bool:
        """irpo.sampling.Scorer: score() matches the samples' log-probs when they are returned."""
        return bool(getattr(sampler_cfg, "return_logprobs", False))

    def _decode(self, tokens: list[int], step_logprobs: list[float] | None = None) -> Generation:
        # Everything after the first EOS is padding added once the row finished.
        for k, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, finished = tokens[: k + 1], True
                break
        else:
            finished = False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        logprob = None
        # As vLLM's: only where the trainer will score exactly these ids (EOS included).
        if step_logprobs is not None and finished and encode_response(self.tokenizer, text) == tokens:
            logprob = float(sum(step_logprobs[: len(tokens)]))
        return Generation(text=text, num_tokens=len(tokens), finished=finished, logprob=logprob)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], desc: str = "scoring") -> list[float | None]:
        """Summed log-prob of each response after its prompt, as :attr:`Generation.logprob`.

        The ids are ``encode_prompt(prompt) + encode_response(response)``, what the trainer
        scores, in the trainer's packed forward (``batch_size`` sequences per row); None where
        the sequence does not fit the model's context (the trainer cuts such responses).
        """
        from irpo.training.data import TokenizedExample
        from irpo.training.packing import packed_logprobs

        seqs = [(encode_prompt(self.tokenizer, p), encode_response(self.tokenizer, r))
                for p, r in zip(prompts, responses, strict=True)]
        fits = [i for i, (p, r) in enumerate(seqs) if self.context is None or len(p) + len(r) <= self.context]
        values: list[float | None] = [None] * len(seqs)
        previous = self.model.config._attn_implementation
        try:
            for start in tqdm(range(0, len(fits), self.cfg.batch_size), desc=desc, mininterval=1.0):
                part = fits[start : start + self.cfg.batch_size]
                logps, _ = packed_logprobs(self.model, [TokenizedExample(*seqs[i]) for i in part], self.device)
                for i, v in zip(part, logps.tolist()):
                    values[i] = v
        finally:
            self.model.set_attn_implementation(previous)  # generate() keeps its own attention
        return values

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":  # the train stage that follows needs the memory back
            torch.cuda.empty_cache()


def _check_args(n: int, temperature: float, max_new_tokens: int, batch_size: int,
                field: str = "sampler.batch_size") -> None:
    if n < 1:
        raise ValueError(f"n={n} samples per prompt must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature == 0 and n != 1:
        raise ValueError(f"temperature=0 is greedy decoding, which gives one sample per prompt; got n={n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"{field}={batch_size} must be >= 1")
