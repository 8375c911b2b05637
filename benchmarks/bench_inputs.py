"""The model and preference pairs that the training-step benchmarks give to every trainer.

Used by benchmarks/train_step.py (ours against TRL's DPOTrainer) and
benchmarks/ref_logprobs.py; not run on its own. ``build_inputs(workdir)`` writes:

* ``workdir/model``: a randomly initialised Llama of about 10M parameters (head_dim 32)
  with the project's tokenizer (the byte-level BPE that the built-in model M0 trains on
  the arithmetic pre-training texts), saved with ``save_pretrained``;
* ``workdir/pairs.jsonl``: ``{"id", "prompt", "chosen", "rejected"}`` records from the
  arithmetic task: chosen = the gold chain of thought, rejected = the same text with the
  final result's last digit changed (a wrong answer);
* ``workdir/pairs_varlen.jsonl``: 16 such pairs of mixed lengths (for one loss check).

Every pair has the same prompt length and the same response length in tokens. So no
batch has padding, whatever the shuffle, and each trainer does exactly the same
arithmetic per step; TRL's ``sft`` term (a mean over all chosen tokens of the batch) then
also equals our per-sequence length-normalised NLL (see train_step.md).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from irpo.builtin_model import build_model, build_tokenizer, pretrain_data_config
from irpo.config import Config, MethodConfig, ModelConfig, SamplerConfig
from irpo.modeling import encode_prompt, encode_response
from irpo.tasks.arith import ArithConfig, ArithTask
from irpo.training.torch_trainer import TorchTrainerConfig

# About 10M parameters: 10 layers x (4*256^2 attention + 3*256*1024 MLP) + 474x256 tied
# embedding. head_dim = 256 / 8 = 32, as the issue asks (and vLLM needs).
BENCH_MODEL = ModelConfig(
    name="bench10m", builtin="tiny", hidden_size=256, num_layers=10, num_heads=8,
    intermediate_size=1024, vocab_size=512, max_position_embeddings=512, pretrain_seed=0,
)
VARLEN_PAIRS = 16


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    pairs_file: Path
    pairs: list[dict]
    prompt_tokens: int  # per pair, BOS included
    response_tokens: int  # per chosen and per rejected response, EOS included
    num_parameters: int


def corrupt(cot: str) -> str:
    """The gold CoT with the last digit of the final result changed in both places it appears.

    Digits are single tokens in this tokenizer, so the token count does not change.
    """
    m = re.search(r"(\d+)\.\s*Final answer: (\d+)$", cot)
    if m is None or m.group(1) != m.group(2):
        raise ValueError(f"not an arithmetic gold CoT ending in 'r. Final answer: r': {cot!r}")
    wrong = m.group(2)[:-1] + str((int(m.group(2)[-1]) + 1) % 10)
    return cot[: m.start(1)] + wrong + cot[m.end(1) : m.start(2)] + wrong


def select_pairs(examples, tokenizer, count: int) -> tuple[list[dict], int, int]:
    """``count`` pairs from the most common (prompt length, response length) in tokens."""
    lengths = []
    for e in examples:
        lengths.append((len(encode_prompt(tokenizer, e.prompt)), len(encode_response(tokenizer, e.gold_cot))))
    (p_len, r_len), available = Counter(lengths).most_common(1)[0]
    if available < count:
        raise ValueError(f"only {available} problems have the most common lengths ({p_len}, {r_len}); "
                         f"asked for {count} pairs")
    pairs = []
    for e, lens in zip(examples, lengths):
        if lens == (p_len, r_len) and len(pairs) < count:
            rejected = corrupt(e.gold_cot)
            if len(encode_response(tokenizer, rejected)) != r_len:
                raise AssertionError(f"corrupting changed the token count of {e.gold_cot!r}")
            pairs.append({"id": e.id, "prompt": e.prompt, "chosen": e.gold_cot, "rejected": rejected})
    return pairs, p_len, r_len


def build_inputs(workdir: Path, num_pairs: int, model_cfg: ModelConfig = BENCH_MODEL,
                 pool_size: int = 20000) -> Inputs:
    """Build (deterministically) the benchmark model and pairs under ``workdir``."""
    workdir = Path(workdir)
    data_cfg = pretrain_data_config(None)  # the built-in model's pre-training data
    if pool_size != data_cfg.pretrain_size:
        from dataclasses import replace

        data_cfg = replace(data_cfg, pretrain_size=pool_size)
    examples = ArithTask(data_cfg).load_split("pretrain")
    tokenizer = build_tokenizer([e.prompt + (e.gold_cot or "") for e in examples], model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer)  # seeded by model_cfg.pretrain_seed
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs, p_len, r_len = select_pairs(examples, tokenizer, num_pairs)
    pairs_file = workdir / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # Pairs of mixed lengths, as the driver sees them: only for the loss check that shows
    # how TRL's sft term differs from our NLL when chosen lengths differ.
    varlen = [{"id": e.id, "prompt": e.prompt, "chosen": e.gold_cot, "rejected": corrupt(e.gold_cot)}
              for e in examples[:VARLEN_PAIRS]]
    (workdir / "pairs_varlen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in varlen))
    return Inputs(model_dir, pairs_file, pairs, p_len, r_len, model.num_parameters())


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_flops(model_config, sequences: int, seq_len: int, passes: float) -> float:
    """Matmul FLOPs of ``passes`` forward-equivalents over ``sequences`` x ``seq_len`` tokens.

    One forward is 2 FLOPs per weight per token (the tied LM head counted as a matmul, the
    embedding lookup not) plus attention's QK^T and AV, 4 * layers * context * hidden per
    token (counting the full square, as the SDPA kernel computes it). A training step of
    the policy is 3 passes (forward, backward = 2x); a reference forward adds 1.
    """
    return passes * sequences * seq_len * _per_token(model_config, seq_len)


def shared_prefix_flops(model_config, pairs: int, prompt_len: int, response_len: int,
                        passes: float) -> float:
    """The same for pairs whose prompt runs once (irpo.training.shared_prefix): ``pairs``
    prompts, then 2 x ``pairs`` responses attending to prompt + response."""
    prompt = pairs * prompt_len * _per_token(model_config, prompt_len)
    responses = 2 * pairs * response_len * _per_token(model_config, prompt_len + response_len)
    return passes * (prompt + responses)


def _per_token(c, context: int) -> float:
    d, layers, ff, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff  # q, o, k, v projections; gate, up, down
    weights = layers * per_layer + vocab * d
    return 2 * weights + 4 * layers * context * d


def rpo_config(model_dir: Path, args, beta: float, sampler: str = "hf", **trainer) -> Config:
    """The rpo training stage's config for our trainer on the benchmark model.

    ``args`` gives lr, batch_size and alpha; ``trainer`` overrides TorchTrainerConfig fields
    (default: 10% warm-up, linear schedule, ``device`` auto: the GPU if there is one).
    """
    tcfg = TorchTrainerConfig(name="torch", lr=args.lr, batch_size=args.batch_size,
                              **{"warmup_ratio": 0.1, "schedule": "linear", **trainer})
    return Config(dataset=ArithConfig(), model=ModelConfig(name="bench", path=str(model_dir)),
                  method=MethodConfig(name="rpo"), sampler=SamplerConfig(name=sampler),
                  trainer=tcfg, beta=beta, alpha=args.alpha)
