"""Packed forward passes: a micro-batch's sequences in one row, no padding, each pair's prompt once.

Before, a micro-batch was a padded rectangle: prompts padded to the longest prompt and
responses to the longest response (irpo.training.shared_prefix), 19% padding on real
pairs whose lengths differ. Here every token of the micro-batch sits in one row of length
L = sum over pairs of (prompt + chosen + rejected), laid out pair after pair as
``[P_i, C_i, R_i]``. Each token keeps its own position in its sequence (``position_ids``:
the prompt 0..p-1, the chosen response and the rejected one both p, p+1, ...), so rotary
embeddings see what they see in a one-sequence forward, and the attention keeps sequences
apart: a prompt token attends to its prompt, a chosen token to its prompt and the chosen
tokens before it, a rejected token to its prompt and the rejected tokens before it (a tree:
the prompt is run once and both responses continue from it). The linear layers, MLPs and
norms (most of the FLOPs) see no padding at all, and the LM head runs only where a logit
predicts a response token (``logits_to_keep``), not over prompts.

The tree attention is an attention function registered with transformers' AttentionInterface
(``irpo_packed``) and reached through the ``irpo_packing`` keyword, which the model hands to
every attention layer. It runs two batched ``scaled_dot_product_attention`` calls per layer:
``[P_i, C_i]`` against itself, causal (the sequences right-padded to the longest inside the
call only, which plain causality keeps apart), and ``R_i`` against ``[P_i, R_i]``, causal from
the bottom right. So the padding left is inside attention (its score matrices), the same
amount as before; the token-level work has none. Without ``irpo_packing`` the function is
transformers' SDPA, so the model still works unpacked (e.g. under gradient checkpointing's
recomputation the keyword is replayed too). The same code runs on a GPU: SDPA picks its
memory-efficient kernel for the masked call; FlashAttention's varlen kernel would take the
same index tensors but is not wired here. Usage::

    logps, lengths = packed_logprobs(model, examples, device)   # [2B]: chosen rows, then rejected

— the layout of ``batch_logprobs(model, pair_batch(examples, pad_id))``; examples without a
rejected response give B rows. Log-probs and gradients equal the padded computation's up to
float rounding (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irpo.training.data import TokenizedExample

ATTENTION_NAME = "irpo_packed"


@dataclass
class AttentionGroup:
    """One batched SDPA call: segment s's queries are packed positions ``q_index[s]``
    (right-padded with 0), its keys ``k_index[s]``; ``mask`` None means plain causal."""

    q_index: torch.Tensor  # [S, Q] long
    k_index: torch.Tensor  # [S, K] long
    mask: torch.Tensor | None  # [S, 1, Q, K] bool (True: attend), or None: causal, Q == K


@dataclass
class PackingPlan:
    groups: list[AttentionGroup]
    out_index: torch.Tensor  # [L]: each packed position's row in the groups' concatenated outputs

    def to(self, device) -> PackingPlan:
        groups = [AttentionGroup(g.q_index.to(device), g.k_index.to(device),
                                 None if g.mask is None else g.mask.to(device)) for g in self.groups]
        return PackingPlan(groups, self.out_index.to(device))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    keep: torch.Tensor  # [T]: packed positions whose logits predict a response token
    targets: torch.Tensor  # [T]: the token each predicts
    rows: torch.Tensor  # [T]: its output row (chosen rows 0..B-1, then rejected rows)
    num_rows: int
    plan: PackingPlan

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.keep.to(device),
                           self.targets.to(device), self.rows.to(device), self.num_rows,
                           self.plan.to(device))


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for s, r in enumerate(rows):
        out[s, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pack_examples(examples: list[TokenizedExample]) -> PackedBatch:
    """The packed row of ``examples`` (all with a rejected response, or none)."""
    pairs = examples[0].rejected is not None
    if any((e.rejected is not None) != pairs for e in examples):
        raise ValueError("pack_examples: either every example has a rejected response or none has")
    b = len(examples)
    ids: list[int] = []
    positions: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    causal_q: list[list[int]] = []  # [P_i, C_i]: queries and keys alike
    tail_q: list[list[int]] = []  # R_i
    tail_k: list[list[int]] = []  # [P_i, R_i]
    tail_shape: list[tuple[int, int]] = []
    for i, e in enumerate(examples):
        o, p, c = len(ids), len(e.prompt), len(e.chosen)
        if p == 0 or c == 0 or (pairs and not e.rejected):
            raise ValueError(f"pack_examples: example {i} has an empty prompt or response")
        ids += e.prompt + e.chosen
        positions += list(range(p + c))
        causal_q.append(list(range(o, o + p + c)))
        # Logit at t predicts token t+1; the prompt's last position predicts each response's first.
        keep += [o + p - 1] + list(range(o + p, o + p + c - 1))
        targets += e.chosen
        rows += [i] * c
        if pairs:
            r, start = len(e.rejected), o + p + c
            ids += e.rejected
            positions += list(range(p, p + r))
            tail_q.append(list(range(start, start + r)))
            tail_k.append(list(range(o, o + p)) + list(range(start, start + r)))
            tail_shape.append((p, r))
            keep += [o + p - 1] + list(range(start, start + r - 1))
            targets += e.rejected
            rows += [b + i] * r
    groups = [AttentionGroup(_padded(causal_q), _padded(causal_q), None)]
    flat = [t for seg in causal_q for t in seg]
    slots = [s * groups[0].q_index.shape[1] + j for s, seg in enumerate(causal_q) for j in range(len(seg))]
    if pairs:
        q_index, k_index = _padded(tail_q), _padded(tail_k)
        mask = torch.zeros((b, 1, q_index.shape[1], k_index.shape[1]), dtype=torch.bool)
        mask[:, :, :, 0] = True  # padded query rows see one real key (some kernels give NaN for none)
        for s, (p, r) in enumerate(tail_shape):
            # rejected token j sees the prompt and rejected tokens 0..j: keys 0 .. p + j
            mask[s, 0, :r, : p + r] = torch.ones(r, p + r, dtype=torch.bool).tril(p)
        groups.append(AttentionGroup(q_index, k_index, mask))
        base = groups[0].q_index.numel()
        flat += [t for seg in tail_q for t in seg]
        slots += [base + s * q_index.shape[1] + j for s, seg in enumerate(tail_q) for j in range(len(seg))]
    out_index = torch.empty(len(ids), dtype=torch.long)
    out_index[torch.tensor(flat)] = torch.tensor(slots)
    return PackedBatch(torch.tensor([ids]), torch.tensor([positions]), torch.tensor(keep),
                       torch.tensor(targets), torch.tensor(rows), b * (2 if pairs else 1),
                       PackingPlan(groups, out_index))


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """AttentionInterface function: the tree attention of a PackingPlan, else transformers' SDPA."""
    plan: PackingPlan | None = kwargs.get("irpo_packing")
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    groups = getattr(module, "num_key_value_groups", 1)
    q, k, v = query[0], repeat_kv(key, groups)[0], repeat_kv(value, groups)[0]  # [H, L, D]
    heads, _, dim = q.shape
    outs = []
    for g in plan.groups:
        s, width = g.q_index.shape

        def gather(x, index):
            return x.index_select(1, index.reshape(-1)).view(heads, index.shape[0], index.shape[1], dim) \
                    .transpose(0, 1)  # [S, H, width, D]

        o = torch.nn.functional.scaled_dot_product_attention(
            gather(q, g.q_index), gather(k, g.k_index), gather(v, g.k_index), attn_mask=g.mask,
            dropout_p=dropout, is_causal=g.mask is None, scale=scaling)
        outs.append(o.transpose(0, 1).reshape(heads, s * width, dim))
    out = torch.cat(outs, dim=1).index_select(1, plan.out_index)  # [H, L, D]
    return out.transpose(0, 1).unsqueeze(0), None  # [1, L, H, D], as transformers' functions return


def use_packed_attention(model) -> None:
    """Route the model's attention through :func:`packed_attention` (idempotent).

    Registered under its own name, with SDPA's mask builder, so calls without a plan still
    get their padding masks.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    if module.config._attn_implementation != ATTENTION_NAME:
        module.set_attn_implementation(ATTENTION_NAME)


def packed_logprobs(model, examples: list[TokenizedExample],
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs float32, response length) per row: chosen rows, then
    rejected rows; one forward over the packed row of ``examples``."""
    batch = pack_examples(examples)
    if device is not None:
        batch = batch.to(device)
    use_packed_attention(model)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=None, use_cache=False, logits_to_keep=batch.keep,
                   irpo_packing=batch.plan).logits[0]  # [T, V]
    # At least float32, as irpo.losses.sequence_logprobs: DPO is made of small log-prob
    # differences (float64 stays float64, which the exactness tests use).
    logits = logits if logits.dtype == torch.float64 else logits.float()
    token = logits.gather(-1, batch.targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    logps = torch.zeros(batch.num_rows, dtype=token.dtype, device=token.device).index_add(
        0, batch.rows, token)
    counts = torch.bincount(batch.rows, minlength=batch.num_rows)
    return logps, counts


def padding_fraction(examples: list[TokenizedExample], packed: bool) -> float:
    """Share of the token positions a forward computes that are padding: 0 packed; padded, the
    shared-prefix batch of pairs (prompts to the longest prompt, responses to the longest
    response) or the rows of prompt + response of single sequences."""
    if packed:
        return 0.0
    p = [len(e.prompt) for e in examples]
    if examples[0].rejected is None:
        rows = [len(e.prompt) + len(e.chosen) for e in examples]
        return 1 - sum(rows) / (len(rows) * max(rows))
    r = [len(x) for e in examples for x in (e.chosen, e.rejected)]
    return 1 - (sum(p) + sum(r)) / (len(p) * max(p) + len(r) * max(r))
