"""Log-probs of a pair's chosen and rejected responses with their common prompt run once.

The two sequences of a preference pair start with the same prompt. As two rows of one
batch (irpo.training.data.pair_batch) the prompt is computed twice. Here the prompts run
once with the KV cache on, the cache is repeated for the two responses, and the responses
run on top of it; gradients flow through the cached keys and values into the prompt's
computation, so log-probs and gradients are those of the two-row forward up to float
rounding, for (P + 2R) / (2P + 2R) of the token FLOPs (P, R: prompt and response tokens;
0.71 on the arithmetic task's pairs, less with few-shot prompts). Usage::

    logps, lengths = pair_logprobs(model, examples, pad_id)   # [2B]: chosen rows, then rejected

— the layout of ``batch_logprobs(model, pair_batch(examples, pad_id))``. The trainers now
use irpo.training.packing (the prompt once too, and no padding at all, in one forward call);
this padded layout stays selectable (``micro_loss(..., layout="shared_prefix")``) as the
computation the packed one is tested and benchmarked against. Prompts are right-padded, so no query row is fully masked, and every response
token gets its true position (``position_ids``), so rotary embeddings see the same positions
as in the two-row forward.
"""

from __future__ import annotations

import torch

from irpo.losses import sequence_logprobs
from irpo.training.data import IGNORE_INDEX, TokenizedExample, two_rows_logprobs


def shared_prefix_batch(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded prompts [B, P] and responses [2B, R] (rows c0, r0, c1, r1, ...), masks and labels.

    ``labels`` [2B, R + 1] has a leading ignored column: position 0 stands for the prompt's
    last token, whose logits predict the first response token.
    """
    b = len(examples)
    prompt_lengths = torch.tensor([len(e.prompt) for e in examples])
    width = int(prompt_lengths.max())
    prompt_ids = torch.full((b, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, width), dtype=torch.long)
    responses = [r for e in examples for r in (e.chosen, e.rejected)]
    r_width = max(len(r) for r in responses)
    response_ids = torch.full((2 * b, r_width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((2 * b, r_width), dtype=torch.long)
    labels = torch.full((2 * b, r_width + 1), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        prompt_ids[i, : len(e.prompt)] = torch.tensor(e.prompt)
        prompt_mask[i, : len(e.prompt)] = 1
    for row, r in enumerate(responses):
        response_ids[row, : len(r)] = torch.tensor(r)
        response_mask[row, : len(r)] = 1
        labels[row, 1 : len(r) + 1] = torch.tensor(r)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompt_lengths": prompt_lengths,
            "response_ids": response_ids, "response_mask": response_mask, "labels": labels}


def pair_logprobs(model, examples: list[TokenizedExample], pad_id: int,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, response length) [2B]: chosen rows, then rejected rows.

    Falls back to the two-row forward where a KV cache cannot carry gradients (gradient
    checkpointing turns the cache off) or the model returns none.
    """
    if examples[0].rejected is None or getattr(model, "is_gradient_checkpointing", False):
        return two_rows_logprobs(model, examples, pad_id, device)
    batch = shared_prefix_batch(examples, pad_id)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    b = len(examples)
    prompt = model(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], use_cache=True)
    cache = prompt.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return two_rows_logprobs(model, examples, pad_id, device)
    rows = torch.arange(b, device=batch["prompt_lengths"].device)
    last = prompt.logits[rows, batch["prompt_lengths"] - 1]  # [B, V]: predicts response token 0
    cache.batch_repeat_interleave(2)  # prompt i's keys/values for rows 2i (chosen) and 2i+1
    lengths2 = batch["prompt_lengths"].repeat_interleave(2)
    r_width = batch["response_ids"].shape[1]
    positions = lengths2[:, None] + torch.arange(r_width, device=lengths2.device)[None]
    mask = torch.cat([batch["prompt_mask"].repeat_interleave(2, dim=0), batch["response_mask"]], dim=1)
    response = model(input_ids=batch["response_ids"], attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True)
    logits = torch.cat([last.repeat_interleave(2, dim=0)[:, None], response.logits], dim=1)
    logps, counts = sequence_logprobs(logits, batch["labels"])
    return torch.cat([logps[0::2], logps[1::2]]), torch.cat([counts[0::2], counts[1::2]])

