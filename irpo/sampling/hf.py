"""The ``hf`` sampler: transformers ``generate`` in this process (CPU, tests, small models).

Built by :func:`irpo.sampling.build_sampler` for ``sampler=hf``::

    sampler = HFSampler(model_path, HFSamplerConfig(name="hf", batch_size=64), dtype="float32")
    outs = sampler.generate(prompts, n=8, temperature=1.0, max_new_tokens=96, seed=0)

Prompts are sorted by length and sent ``cfg.batch_size`` at a time, left
padded, each expanded to ``n`` samples with a KV cache; results come back in
the original order. Sampling is pure temperature/top-p sampling from the
model (the checkpoint's own generation defaults such as top-k or repetition
penalties are deliberately not applied: IRPO samples from the model itself).
Batch ``b`` is seeded with ``seed + first_index + b``, so a call is reproducible for
a given seed, prompt list and batch size (``first_index``: where a chunk of a stage's
prompts starts, irpo.chunks; 0 for a whole list, whose seeds are then ``seed + b``).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from irpo.modeling import context_length, encode_prompt, eos_token_ids, load_model, resolve_device
from irpo.sampling import Generation

log = logging.getLogger(__name__)


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
        _check_args(n, temperature, max_new_tokens, self.cfg.batch_size)
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        self._check_lengths(encoded, max_new_tokens)
        # Similar lengths together: less padding, fewer wasted positions per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[list[Generation] | None] = [None] * len(prompts)
        bs = self.cfg.batch_size
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

    @torch.inference_mode()
    def _generate_batch(self, batch: list[list[int]], n: int, temperature: float,
                        max_new_tokens: int, seed: int) -> list[list[Generation]]:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding: every prompt ends at column `width`
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        sampling = temperature > 0
        # A fresh config instead of the checkpoint's, so no hidden top-k/penalties apply.
        config = GenerationConfig(
            do_sample=sampling,
            num_beams=1,
            num_return_sequences=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            bos_token_id=self.tokenizer.bos_token_id,
            **({"temperature": temperature, "top_p": self.cfg.top_p, "top_k": 0} if sampling else {}),
        )
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=config,
        )
        rows = out[:, width:].tolist()  # row p*n + j is sample j of prompt p
        gens = [self._decode(row) for row in rows]
        return [gens[p * n : (p + 1) * n] for p in range(len(batch))]

    def _decode(self, tokens: list[int]) -> Generation:
        # Everything after the first EOS is padding added once the row finished.
        for k, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, finished = tokens[: k + 1], True
                break
        else:
            finished = False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text, num_tokens=len(tokens), finished=finished)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":  # the train stage that follows needs the memory back
            torch.cuda.empty_cache()


def _check_args(n: int, temperature: float, max_new_tokens: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n={n} samples per prompt must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature == 0 and n != 1:
        raise ValueError(f"temperature=0 is greedy decoding, which gives one sample per prompt; got n={n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"sampler.batch_size={batch_size} must be >= 1")
