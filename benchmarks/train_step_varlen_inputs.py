"""The variable-length workload of benchmarks/train_step.py: real pairs of the default run.

``build_varlen_inputs(workdir, num_pairs)`` writes, deterministically:

* ``workdir/model``: the fixed-length workload's ~10M-parameter random Llama (bench_inputs.py);
* ``workdir/pairs.jsonl``: preference pairs as iteration 1 of the default run makes them:
  the built-in model M0 samples 8 responses per arithmetic training prompt (``sampler=hf``,
  temperature 1, max_new_tokens 96), the task's checker labels them, and irpo.pairs builds
  the pairs (gold CoT among the winners, 2 pairs per prompt), up to ``num_pairs``. Prompts and
  responses differ in length, as in a real stage. Each response carries the reference
  log-prob that sampling from the benchmark model would have returned
  (``chosen_ref_logprob``, ``rejected_ref_logprob``: ``HFSampler.score`` with the benchmark
  model, which equals the sampled log-prob), so our trainer needs no reference pass, as in
  a default run; sides that measure the reference pass drop them.

:func:`padding` gives the share of computed token positions that are padding for each
side's batch layout over the same batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLES_PER_PROMPT = 8


def _default_config():
    from hydra import compose, initialize_config_dir

    from irpo.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return to_config(compose("config"))


def sample_pairs(num_pairs: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Pairs of the default run's first iteration (M0's samples), in batches of 64 prompts."""
    from irpo.builtin_model import ensure_builtin_model
    from irpo.pairs import build_examples
    from irpo.sampling.hf import HFSampler, HFSamplerConfig
    from irpo.tasks.arith import build_arith

    cfg = _default_config()
    m0 = ensure_builtin_model(cfg.model, cfg.dataset, Path(cfg.cache_dir))
    train = build_arith(cfg.dataset).load_split("train")
    task = build_arith(cfg.dataset)
    sampler = HFSampler(str(m0), HFSamplerConfig(name="hf", batch_size=64, device="cpu",
                                                 return_logprobs=False))
    pairs, used, samples = [], 0, 0
    try:
        while len(pairs) < num_pairs and used < len(train):
            part = train[used : used + 64]
            gens = sampler.generate([e.prompt for e in part], SAMPLES_PER_PROMPT, 1.0,
                                    cfg.dataset.max_new_tokens, seed * 1000 + 1, first_index=used)
            records = [{"id": e.id, "prompt": e.prompt, "gold_answer": e.gold_answer, "gold_cot": e.gold_cot,
                        "samples": [{"text": g.text, "num_tokens": g.num_tokens, "finished": g.finished,
                                     "correct": task.is_correct(g.text, e.gold_answer)} for g in gs]}
                       for e, gs in zip(part, gens)]
            found, _ = build_examples(records, "pairs", cfg.pairs_per_prompt,
                                      add_gold_to_winners=cfg.dataset.add_gold_to_winners,
                                      max_examples=None, seed=seed)
            pairs += found
            used += len(part)
            samples += len(part) * SAMPLES_PER_PROMPT
    finally:
        sampler.close()
    info = {"sampling_model": str(m0), "prompts_sampled": used, "samples": samples,
            "samples_per_prompt": SAMPLES_PER_PROMPT, "temperature": 1.0,
            "max_new_tokens": cfg.dataset.max_new_tokens, "pairs_per_prompt": cfg.pairs_per_prompt,
            "add_gold_to_winners": cfg.dataset.add_gold_to_winners}
    return pairs[:num_pairs], info


def build_varlen_inputs(workdir: Path, num_pairs: int) -> dict:
    """Model and pairs under ``workdir`` (reused when already built for ``num_pairs``)."""
    from bench_inputs import build_inputs, read_pairs

    workdir = Path(workdir)
    meta_file, all_file = workdir / "varlen.json", workdir / "pairs_all.jsonl"
    if meta_file.exists() and json.loads(meta_file.read_text())["pairs_built"] >= num_pairs:
        meta = {**json.loads(meta_file.read_text()), "pairs": num_pairs}  # the first num_pairs
        (workdir / "pairs.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in read_pairs(all_file)[:num_pairs]))
        return meta
    inputs = build_inputs(workdir, 16)  # the benchmark model (and the loss-check pairs)
    pairs, info = sample_pairs(num_pairs)
    if len(pairs) < num_pairs:
        raise SystemExit(f"only {len(pairs)} pairs from the whole train split; asked for {num_pairs}")
    from irpo.sampling.hf import HFSampler, HFSamplerConfig

    scorer = HFSampler(str(inputs.model_dir), HFSamplerConfig(name="hf", batch_size=32, device="cpu"))
    prompts = [p["prompt"] for p in pairs]
    for side in ("chosen", "rejected"):
        for p, v in zip(pairs, scorer.score(prompts, [p[side] for p in pairs])):
            p[f"{side}_ref_logprob"] = v
    scorer.close()
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    all_file.write_text((workdir / "pairs.jsonl").read_text())
    meta = {"pairs": num_pairs, "pairs_built": num_pairs, "num_parameters": inputs.num_parameters, **info}
    meta_file.write_text(json.dumps(meta, indent=1))
    return meta


def token_lengths(model_dir: Path, pairs: list[dict]):
    from irpo.modeling import load_tokenizer
    from irpo.training.data import tokenize_examples

    toks, _ = tokenize_examples(load_tokenizer(str(model_dir)), pairs, 10**6)
    return toks


def padding(model_dir: Path, pairs: list[dict], batch_size: int, seed: int = 0) -> dict:
    """Padding share of the computed token positions per layout, over one epoch of our batches.

    ours: packed, none. ours_padded: prompts padded to the batch's longest prompt, responses to
    its longest response (the shared-prefix layout). TRL 1.16: 2B rows of prompt + response,
    right-padded to the longest (its padding_free mode is disabled in this version).
    """
    from irpo.training.torch_trainer import batch_order

    toks = token_lengths(model_dir, pairs)
    steps = -(-len(toks) // batch_size)
    useful = useful_trl = computed_shared = computed_trl = 0
    for idx in batch_order(len(toks), steps, batch_size, seed):
        batch = [toks[i] for i in idx]
        p = [len(t.prompt) for t in batch]
        r = [len(x) for t in batch for x in (t.chosen, t.rejected)]
        useful += sum(p) + sum(r)
        computed_shared += len(p) * max(p) + len(r) * max(r)
        useful_trl += 2 * sum(p) + sum(r)  # TRL runs each prompt twice: that is not padding
        computed_trl += 2 * len(batch) * max(len(t.prompt) + max(len(t.chosen), len(t.rejected))
                                             for t in batch)
    stats = {
        "prompt_tokens_mean": sum(len(t.prompt) for t in toks) / len(toks),
        "prompt_tokens_range": [min(len(t.prompt) for t in toks), max(len(t.prompt) for t in toks)],
        "response_tokens_mean": sum(len(t.chosen) + len(t.rejected) for t in toks) / (2 * len(toks)),
        "response_tokens_range": [min(min(len(t.chosen), len(t.rejected)) for t in toks),
                                  max(max(len(t.chosen), len(t.rejected)) for t in toks)],
    }
    return {"ours": 0.0, "ours_refpass": 0.0, "ours_padded": 1 - useful / computed_shared,
            "trl": 1 - useful_trl / computed_trl, "trl_pre": 1 - useful_trl / computed_trl,
            "lengths": stats}
