"""Training examples as token ids, padded batches for the forward pass, and their log-probs.

An example is a prompt and a chosen response, plus a rejected one for
preference methods. Prompt and responses are tokenized separately and
concatenated (irpo.modeling's convention, shared with the samplers), and the
prompt positions are masked out of the labels, so log-probs cover exactly the
response tokens: chain of thought, answer and EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irpo.losses import sequence_logprobs
from irpo.modeling import encode_prompt, encode_response

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None = None
    # The sampler's reference log-prob of each response (irpo.pairs.REF_KEYS), if it gave
    # one for exactly these token ids; None: the trainer computes it (irpo.training.reference).
    chosen_ref: float | None = None
    rejected_ref: float | None = None


def tokenize_examples(tokenizer, examples: list[dict], max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenize ``{"prompt", "chosen"[, "rejected"]}`` records.

    Responses that would overflow ``max_length`` are cut from the right (the
    count is returned so the caller can report it); a prompt that alone leaves
    no room for a response is an error naming the example. The sampler's reference
    log-probs (``chosen_ref_logprob``, ``rejected_ref_logprob``) come along, except for a
    cut response: they are of the whole one.
    """
    out, truncated = [], 0
    for i, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, ex["prompt"])
        room = max_length - len(prompt)
        if room < 2:
            raise ValueError(
                f"training example {i} (id={ex.get('id')}): prompt is {len(prompt)} tokens, "
                f"leaving no room under the model's max length {max_length}"
            )
        responses, refs = [], []
        for key in ("chosen", "rejected"):
            if ex.get(key) is None:
                responses.append(None)
                refs.append(None)
                continue
            ids = encode_response(tokenizer, ex[key])
            truncated += len(ids) > room
            responses.append(ids[:room])
            refs.append(ex.get(f"{key}_ref_logprob") if len(ids) <= room else None)
        out.append(TokenizedExample(prompt, responses[0], responses[1], refs[0], refs[1]))
    return out, truncated


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, response) id lists into input_ids, attention_mask, labels."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (p, r) in enumerate(sequences):
        n = len(p) + len(r)
        input_ids[row, :n] = torch.tensor(p + r)
        labels[row, len(p):n] = torch.tensor(r)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pair_batch(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows (if any), in one batch: one forward pass."""
    seqs = [(e.prompt, e.chosen) for e in examples]
    if examples[0].rejected is not None:
        seqs += [(e.prompt, e.rejected) for e in examples]
    return collate(seqs, pad_id)


def batch_logprobs(model, batch: dict[str, torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, response length) per row of ``batch`` (moved to ``device``)."""
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


def two_rows_logprobs(model, examples: list[TokenizedExample], pad_id: int,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``two_rows`` layout (irpo.training.logprobs): every sequence a padded row of one
    :func:`pair_batch`; chosen rows, then rejected rows. Also where the shared-prefix layout
    falls back to (irpo.training.shared_prefix), so both use this one computation."""
    return batch_logprobs(model, pair_batch(examples, pad_id), device)
