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
from irpo.training.shared_prefix import pair_logprobs


def batch_logprobs(model, batch: dict[str, torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, response length) per row of ``batch`` (moved to ``device``)."""
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


# no_grad, not inference_mode: under DeepSpeed ZeRO-3 this forward gathers
# parameters, and small ones stay gathered; created in inference mode they
# would be inference tensors, and the first training step fails ("Inference
# tensors cannot be saved for backward").
@torch.no_grad()
def reference_logprobs(
    model, examples: list[TokenizedExample], pad_id: int, batch_size: int,
    desc: str = "reference log-probs", device=None, show_progress: bool = True,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-probs of every chosen (and rejected) response, in example order.

    ``share_prompt``: run each pair's prompt once (irpo.training.shared_prefix); use it
    exactly when the training steps do, so policy and reference see the same arithmetic.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        part = examples[start : start + batch_size]
        if share_prompt:
            logps, _ = pair_logprobs(model, part, pad_id, device)
        else:
            logps, _ = batch_logprobs(model, pair_batch(part, pad_id), device)
        chosen.append(logps[: len(part)])
        if part[0].rejected is not None:
            rejected.append(logps[len(part) :])
    model.train(was_training)
    return torch.cat(chosen).float(), (torch.cat(rejected).float() if rejected else None)
