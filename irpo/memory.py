"""GPU memory arithmetic of a run at scale: vLLM sampling and DeepSpeed ZeRO training.

The numbers behind the Llama-2-70B-Chat configuration
(conf/experiment/paper_gsm8k_70b.yaml, explained in docs/cluster.md). Print them,
or those of another Llama-style checkpoint or cluster::

    python -m irpo.memory                                   # Llama-2-70B, 8 nodes x 8 A100-80GB
    python -m irpo.memory --config /ckpt/config.json --nodes 4 --gpu-gib 80 --seq-tokens 2048

Exact: parameter counts (tests/test_cluster_config.py checks them against the
Hugging Face model built on the meta device), KV-cache bytes per token, the 16
bytes per parameter of mixed-precision Adam under ZeRO. Measured: activation
bytes per token of one decoder layer (the same test counts what autograd saves
in transformers' Llama layer with SDPA attention). Estimates, marked as such:
vLLM's reserve for activations and CUDA graphs, and the framework reserve.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
BF16 = 2
# DeepSpeed defaults; the trainer's config (irpo/training/deepspeed_trainer.py) leaves them so.
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # stage3_max_live_parameters: gathered parameters at once
ZERO_REDUCE_BUCKET = 5 * 10**8  # reduce_bucket_size (elements)
ZERO3_SUB_GROUP = 10**9  # sub_group_size: the optimiser steps this many elements at a time


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: RMSNorm, GQA attention without biases, SwiGLU MLP."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # None: hidden / heads
    tied_embeddings: bool = False

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.dim, self.kv_heads * self.dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.intermediate + 2 * h  # q,o; k,v; MLP; 2 norms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + embeddings + self.hidden  # + final norm

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Shape:
        """From a checkpoint's config.json (as a dict)."""
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")  # only where it is not hidden / heads
        return cls(layers=cfg["num_hidden_layers"], hidden=hidden, heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                   head_dim=None if head_dim in (None, hidden // heads) else head_dim,
                   tied_embeddings=cfg.get("tie_word_embeddings", False))


LLAMA2_70B = Shape(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000)


def kv_bytes_per_token(s: Shape, tp: int = 1, dtype_bytes: int = BF16) -> int:
    """K and V of every layer for one token, on one GPU of a tensor-parallel group of ``tp``.

    vLLM splits KV heads over the group; with fewer KV heads than GPUs each GPU keeps one.
    """
    heads_per_gpu = max(s.kv_heads // tp, 1)
    return 2 * s.layers * heads_per_gpu * s.dim * dtype_bytes


def layer_activation_bytes_per_token(s: Shape) -> int:
    """What autograd keeps for the backward of one decoder layer per token, in bf16.

    Two RMSNorms (their float32 input, 4h, and bf16 output, 2h), the MLP's gate,
    up, SiLU(gate) and product (4 x 2i), and attention's q before and after rotary,
    output and o_proj input (4 x 2 x q_dim) plus rotary k and v (2 x 2 x kv_dim);
    tests/test_cluster_config.py measures it within 1%.
    """
    q, kv = s.heads * s.dim, s.kv_heads * s.dim
    return 12 * s.hidden + 8 * s.intermediate + 8 * q + 4 * kv


def sampling(s: Shape, tp: int, gpu_gib: float = 80, utilization: float = 0.9,
             reserve_gib: float = 3.0, seq_tokens: int = 1024) -> dict[str, float]:
    """One vLLM engine over ``tp`` GPUs: weights, KV-cache room, tokens and sequences it holds.

    vLLM takes ``utilization`` x the GPU's memory, loads its weight shard, profiles
    activations and captures CUDA graphs (``reserve_gib``, an estimate), and makes
    the rest KV cache, in blocks shared by all running sequences.
    """
    weights = s.params * BF16 / tp / GiB
    kv_room = gpu_gib * utilization - weights - reserve_gib
    per_token = kv_bytes_per_token(s, tp)
    tokens = int(kv_room * GiB // per_token)
    return {"weights_gib": weights, "kv_room_gib": kv_room, "kv_bytes_per_token": per_token,
            "kv_tokens": tokens, "sequences_at_seq_tokens": tokens // seq_tokens}


def training(s: Shape, gpus: int, zero_stage: int, tokens: int, checkpointing: bool,
             reserve_gib: float = 2.0) -> dict[str, float]:
    """Peak memory per GPU of DeepSpeed ZeRO-2/3 with bf16 mixed precision and AdamW.

    ``tokens``: of one rank's micro-batch (a pair is two sequences). States: bf16
    parameters and gradients (2 + 2 bytes), fp32 master weights and Adam's two
    moments (12 bytes), partitioned over ``gpus``, except that ZeRO-2 keeps every
    parameter on every GPU. The forward/backward adds activations and ZeRO's
    buffers; the optimiser step, after activations are freed, adds an fp32
    gradient and AdamW's denominator for one sub-group. ``reserve_gib`` (CUDA
    context, NCCL, fragmentation) is an estimate.
    """
    p = s.params
    if zero_stage == 3:
        states = 16 * p / gpus
        buffers = (min(ZERO3_MAX_LIVE_PARAMETERS, p) + s.layer_params + ZERO_REDUCE_BUCKET) * BF16
    elif zero_stage == 2:
        states = 2 * p + 14 * p / gpus
        buffers = ZERO_REDUCE_BUCKET * BF16 * 2  # reduce and all-gather buckets
    else:
        raise ValueError(f"zero_stage={zero_stage} must be 2 or 3")
    layer = layer_activation_bytes_per_token(s) * tokens
    if checkpointing:  # each layer's bf16 input, plus one layer recomputed at a time
        activations = s.layers * tokens * s.hidden * BF16 + layer
    else:
        activations = s.layers * layer
    # float32 log-softmax over the vocabulary: logits (bf16 and fp32), their fp32 gradient.
    head = tokens * (6 * s.hidden + 10 * s.vocab)
    optimizer_step = 8 * min(ZERO3_SUB_GROUP, -(-p // gpus))
    gib = {"states_gib": states / GiB, "buffers_gib": buffers / GiB,
           "activations_gib": activations / GiB, "head_gib": head / GiB,
           "optimizer_step_gib": optimizer_step / GiB, "reserve_gib": reserve_gib}
    gib["peak_gib"] = (states + max(buffers + activations + head, optimizer_step)) / GiB + reserve_gib
    return gib


def report(s: Shape, nodes: int = 8, gpus_per_node: int = 8, gpu_gib: float = 80,
           seq_tokens: int = 1024) -> str:
    """The docs/cluster.md table: sampling with TP = gpus_per_node, training variants."""
    lines = [(f"model: {s.params:,} parameters, {s.layers} layers, hidden {s.hidden}, "
              f"{s.heads} heads / {s.kv_heads} KV heads x {s.dim}, MLP {s.intermediate}, vocab {s.vocab}"),
             f"bf16 weights: {s.params * BF16 / GiB:.1f} GiB ({s.params * BF16 / 1e9:.1f} GB)"]
    smp = sampling(s, gpus_per_node, gpu_gib, seq_tokens=seq_tokens)
    lines.append(
        f"sampling, vLLM TP={gpus_per_node} on {gpu_gib:g} GiB GPUs at utilization 0.9: weights "
        f"{smp['weights_gib']:.2f} GiB/GPU; KV cache {smp['kv_bytes_per_token']:,} B/token/GPU "
        f"({kv_bytes_per_token(s):,} B over the group); room {smp['kv_room_gib']:.1f} GiB = "
        f"{smp['kv_tokens']:,} tokens = {smp['sequences_at_seq_tokens']:,} sequences of {seq_tokens} tokens")
    pair = 2 * seq_tokens  # one pair per GPU: chosen and rejected rows
    all_gpus = nodes * gpus_per_node
    variants = dict.fromkeys([(all_gpus, 3, True), (all_gpus, 3, False), (all_gpus // 2, 3, True),
                              (gpus_per_node, 3, True), (all_gpus, 2, True)])  # unique, in order
    for gpus, stage, ckpt in variants:
        t = training(s, gpus, stage, pair, ckpt)
        verdict = "fits" if t["peak_gib"] < gpu_gib else "does NOT fit"
        lines.append(
            f"training, ZeRO-{stage} over {gpus} GPUs, 1 pair x {seq_tokens} tokens, checkpointing "
            f"{'on' if ckpt else 'off'}: states {t['states_gib']:.1f} + buffers {t['buffers_gib']:.1f} + "
            f"activations {t['activations_gib']:.1f} + head {t['head_gib']:.1f} (optimizer step "
            f"{t['optimizer_step_gib']:.1f}) + reserve {t['reserve_gib']:.0f} -> peak "
            f"{t['peak_gib']:.1f} GiB/GPU: {verdict} in {gpu_gib:g} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m irpo.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="a checkpoint's config.json (default: Llama-2-70B)")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80)
    parser.add_argument("--seq-tokens", type=int, default=1024, help="prompt + response, per sequence")
    args = parser.parse_args(argv)
    shape = Shape.from_hf_config(json.loads(args.config.read_text())) if args.config else LLAMA2_70B
    print(report(shape, args.nodes, args.gpus_per_node, args.gpu_gib, args.seq_tokens))


if __name__ == "__main__":
    main()
