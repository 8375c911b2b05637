"""Sequence log-probabilities of responses under a model.

Used by every trainer backend for the policy, and once per iteration for the
reference model: the policy starts from M(t-1), which is also the reference,
so reference log-probs are computed by one pass over the training data before
the first update, and training then needs a single forward per step. Under DeepSpeed
:func:`sharded_reference_logprobs` spreads that pass over the ranks.

Three layouts of the same computation (:func:`examples_logprobs`): ``packed`` (the
trainers' default: one row, no padding, each pair's prompt once; irpo.training.packing),
``shared_prefix`` (padded prompts once, then padded responses on their KV cache;
irpo.training.shared_prefix) and ``two_rows`` (every sequence a padded row,
irpo.training.data.two_rows_logprobs). They agree up to float rounding; the last two stay as the
references the tests and benchmarks compare the packed one with.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from irpo.training.data import TokenizedExample, batch_logprobs, two_rows_logprobs
from irpo.training.packing import packed_logprobs
from irpo.training.shared_prefix import pair_logprobs

LAYOUTS = ("packed", "shared_prefix", "two_rows")
__all__ = ["LAYOUTS", "batch_logprobs", "examples_logprobs", "reference_logprobs",
           "sharded_reference_logprobs"]


def examples_logprobs(model, examples: list[TokenizedExample], pad_id: int, device=None,
                      layout: str = "packed") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs, response lengths): chosen rows, then rejected rows if any."""
    if layout == "packed":
        return packed_logprobs(model, examples, device)
    if layout == "shared_prefix":
        return pair_logprobs(model, examples, pad_id, device)
    if layout == "two_rows":
        return two_rows_logprobs(model, examples, pad_id, device)
    raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")


# no_grad, not inference_mode: under DeepSpeed ZeRO-3 this forward gathers
# parameters, and small ones stay gathered; created in inference mode they
# would be inference tensors, and the first training step fails ("Inference
# tensors cannot be saved for backward").
@torch.no_grad()
def reference_logprobs(
    model, examples: list[TokenizedExample], pad_id: int, batch_size: int,
    desc: str = "reference log-probs", device=None, show_progress: bool = True,
    layout: str = "packed",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-probs of every chosen (and rejected) response, in example order.

    ``layout`` (see :func:`examples_logprobs`): the one the training steps use, so policy and
    reference see the same arithmetic; ``batch_size`` pairs per forward.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        part = examples[start : start + batch_size]
        logps, _ = examples_logprobs(model, part, pad_id, device, layout)
        chosen.append(logps[: len(part)])
        if part[0].rejected is not None:
            rejected.append(logps[len(part) :])
    model.train(was_training)
    return torch.cat(chosen).float(), (torch.cat(rejected).float() if rejected else None)


def sharded_reference_logprobs(model, toks: list[TokenizedExample], pad_id: int, batch_size: int,
                               device, layout: str = "packed") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-probs of every example, each rank scoring ``toks[rank::world]``.

    Under ZeRO-3 a forward gathers parameters with collectives, so every rank
    must run the same number of batches: shards are padded to equal length
    (repeating an example) and the padding dropped after the all-gather.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-len(toks) // world)
    shard = toks[rank::world]
    shard = shard + [toks[0]] * (per_rank - len(shard))
    refs = reference_logprobs(model, shard, pad_id, batch_size, device=device, show_progress=rank == 0,
                              layout=layout)
    gathered = []
    for part in refs:
        if part is None:
            gathered.append(None)
            continue
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        # Row r of the stack holds examples r, r + world, ...: transposing restores example order.
        gathered.append(torch.stack(parts).T.reshape(-1)[: len(toks)])
    return tuple(gathered)
