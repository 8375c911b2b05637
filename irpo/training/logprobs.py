"""Sequence log-probabilities of responses under a model.

Used by every trainer backend for the policy, and once per iteration for the
reference model: the policy starts from M(t-1), which is also the reference,
so reference log-probs are computed by one pass over the training data before
the first update, and training then needs a single forward per step.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from irpo.losses import sequence_logprobs
from irpo.training.data import TokenizedExample, pair_batch


def batch_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, response length) per row of ``batch``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


@torch.inference_mode()
def reference_logprobs(
    model, examples: list[TokenizedExample], pad_id: int, batch_size: int, desc: str = "reference log-probs"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-probs of every chosen (and rejected) response, in example order."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        part = examples[start : start + batch_size]
        logps, _ = batch_logprobs(model, pair_batch(part, pad_id))
        chosen.append(logps[: len(part)])
        if part[0].rejected is not None:
            rejected.append(logps[len(part) :])
    model.train(was_training)
    return torch.cat(chosen).float(), (torch.cat(rejected).float() if rejected else None)
