"""The ``hf`` sampler's decoding loop against plain ``generate``, on the default run's stages.

    .venv/bin/python benchmarks/hf_decode.py [--prompts 256] [--out benchmarks/results/hf_decode]

Both run the shipped M0 in this process at the same thread count, alternating which goes
first, ``--repeats`` times, on the default run's two kinds of generation: the sample stage
(training prompts, N = 4 at temperature 1) and the evaluation's greedy pass (test prompts).
``generate`` is called as irpo's sampler called it before the loop (left-padded batches of
``--batch`` prompts, ``num_return_sequences=N``, a logits processor recording log-probs);
the loop is :func:`irpo.sampling.decode.decode`, at the same batch size and larger ones.
``generate`` with ``cache_implementation="static"`` is measured too (what transformers
offers against the growing cache). Reported: generated tokens/s (EOS included, median),
the ratio to plain ``generate``, and the greedy texts' agreement: every test prompt where
the loop's greedy tokens differ from ``generate``'s, with the gap between the two leading
logits at the first differing step (a near-tie that float rounding of another batch shape
breaks the other way). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import load, machine, versions

MAX_NEW_TOKENS = 96  # dataset=arith's
N = 4  # the default run's samples_per_prompt


class Recorder:
    """The log-prob recorder the sampler passed to ``generate`` before the loop replaced it."""

    def __init__(self):
        self.previous, self.steps = None, []

    def __call__(self, input_ids, scores):
        import torch

        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:])[:, 0])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores


def plain_generate(model, tok, eos, batch, n, temperature, seed, static=False):
    """Row tokens as the sampler's generate-based path returned them (EOS included)."""
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(batch):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    sampling = temperature > 0
    config = GenerationConfig(do_sample=sampling, num_beams=1, num_return_sequences=n,
                              max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                              **({"temperature": temperature, "top_p": 1.0, "top_k": 0} if sampling else {}),
                              **({"cache_implementation": "static"} if static else {}))
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=[Recorder()])
    rows = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def run(method, model, tok, eos, prompts, n, temperature, batch_size):
    from irpo.sampling.decode import decode

    rows, start = [], time.perf_counter()
    for b, s in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[s:s + batch_size]
        if method == "loop":
            rows += decode(model, batch, n, temperature, 1.0, MAX_NEW_TOKENS, eos, tok.pad_token_id, b).tokens
        else:
            rows += plain_generate(model, tok, eos, batch, n, temperature, b, static=method == "static")
    wall = time.perf_counter() - start
    tokens = sum(len(r) for r in rows)
    return rows, {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "load_1min": load()[0]}


def greedy_differences(model, tok, eos, prompts, plain, loop):
    """Prompts whose greedy tokens differ, with the top-2 logit gap at the first difference."""
    import torch

    out = []
    for i, (a, b) in enumerate(zip(plain, loop)):
        if a == b:
            continue
        k = next(k for k in range(min(len(a), len(b)) + 1) if k >= min(len(a), len(b)) or a[k] != b[k])
        with torch.no_grad():
            logits = model(torch.tensor([prompts[i] + a[:k]])).logits[0, -1]
        top = torch.topk(logits, 2).values
        out.append({"prompt": i, "step": k, "top2_logit_gap": float(top[0] - top[1])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loop-batches", default="64,256")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hf_decode"))
    args = parser.parse_args()
    import torch

    from irpo.builtin_model import shipped_model_dir
    from irpo.modeling import encode_prompt, eos_token_ids, load_model
    from irpo.tasks.arith import ArithConfig, build_arith

    model, tok = load_model(shipped_model_dir("tiny"))
    eos = eos_token_ids(model, tok)
    task = build_arith(ArithConfig(train_size=args.prompts, valid_size=0, test_size=args.prompts))
    stages = {"sample (train prompts, N=4, T=1)": ("train", N, 1.0),
              "eval greedy (test prompts)": ("test", 1, 0.0),
              "eval maj@4 (test prompts, N=4, T=0.7)": ("test", N, 0.7)}
    loop_batches = [int(b) for b in args.loop_batches.split(",")]
    variants = [("generate", args.batch), ("static", args.batch)] + [("loop", b) for b in loop_batches]
    result = {"machine": machine(**versions("transformers"), torch_threads=torch.get_num_threads()),
              "prompts": args.prompts, "repeats": args.repeats, "max_new_tokens": MAX_NEW_TOKENS,
              "stages": {}}
    for stage, (split, n, temperature) in stages.items():
        # Sorted by length as the sampler sorts them, so batches pad as little as in a run.
        prompts = sorted((encode_prompt(tok, e.prompt) for e in task.load_split(split)), key=len)
        runs = {f"{m}@{b}": [] for m, b in variants}
        rows = {}
        for rep in range(args.repeats):
            for m, b in (variants if rep % 2 == 0 else variants[::-1]):
                rows[f"{m}@{b}"], stats = run(m, model, tok, eos, prompts, n, temperature, b)
                runs[f"{m}@{b}"].append(stats)
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        base = med[f"generate@{args.batch}"]
        entry = {"runs": runs, "tokens_per_s": med, "ratio_to_generate": {k: v / base for k, v in med.items()}}
        if temperature == 0:
            entry["greedy_differences"] = {
                k: greedy_differences(model, tok, eos, prompts, rows[f"generate@{args.batch}"], rows[k])
                for k in rows if k.startswith("loop")}
        result["stages"][stage] = entry
        print(stage, {k: f"{v:.0f} tok/s ({v / base:.2f}x)" for k, v in med.items()}, flush=True)
    result["eval_stage"] = eval_stage(result["stages"], f"generate@{args.batch}")
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(render(result))


def eval_stage(stages: dict, base: str) -> dict:
    """The evaluation stage as a run has it: its greedy pass and its maj@4 pass together
    (tokens of both over the time of both, repeat by repeat; median), and as the hf sampler
    runs it by default: greedy_batch_size 256, batch_size 64."""
    greedy, maj = (stages[k]["runs"] for k in stages if k.startswith("eval"))
    def rate(gk: str, mk: str) -> float:
        return statistics.median((g["tokens"] + m["tokens"]) / (g["wall_s"] + m["wall_s"])
                                 for g, m in zip(greedy[gk], maj[mk]))

    rates = {k: rate(k, k) for k in greedy}
    if "loop@256" in greedy and "loop@64" in maj:  # the hf sampler's defaults
        rates["loop (greedy@256, maj@64)"] = rate("loop@256", "loop@64")
    return {"tokens_per_s": rates, "ratio_to_generate": {k: v / rates[base] for k, v in rates.items()}}


def render(result: dict) -> str:
    m = result["machine"]
    lines = ["# hf sampler: the decoding loop against plain generate", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, torch {m['torch']} ({m['torch_threads']} "
             f"threads), transformers {m['transformers']}. Shipped M0, {result['prompts']} prompts per stage, "
             f"max_new_tokens {result['max_new_tokens']}, median of {result['repeats']} alternating repeats; "
             "`method@batch` = prompts per call.", "",
             "| stage | method@batch | tokens/s | × generate@64 | 1-min load |", "|---|---|---|---|---|"]
    for stage, e in result["stages"].items():
        for k, v in e["tokens_per_s"].items():
            loads = [r["load_1min"] for r in e["runs"][k]]
            lines.append(f"| {stage} | {k} | {v:.0f} | {e['ratio_to_generate'][k]:.2f} | "
                         f"{min(loads):.1f}-{max(loads):.1f} |")
        for k, diffs in e.get("greedy_differences", {}).items():
            gaps = ", ".join(f"{d['top2_logit_gap']:.2g}" for d in diffs) or "none"
            lines.append(f"\nGreedy, {k} vs generate: {len(diffs)} of {result['prompts']} prompts differ "
                         f"(top-2 logit gap at the first difference: {gaps}).")
    e = result["eval_stage"]
    lines += ["", "The evaluation stage (greedy and maj@4 together):", "",
              "| method@batch | tokens/s | × generate@64 |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {e['ratio_to_generate'][k]:.2f} |" for k, v in e["tokens_per_s"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
