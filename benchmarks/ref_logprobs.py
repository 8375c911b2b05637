"""What the reference log-probs cost per iteration, three ways, on the training-step benchmark's work.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ref_logprobs.py [--pairs 96] [--repeats 3]

One iteration-equivalent = one epoch of rpo training over the same pairs, batch 16, from the
same ~10M-parameter model (bench_inputs.py), with the reference log-probs taken

* ``sampler``: from the sampler that generated the pairs (M(t-1) is both sampler and
  reference; sampler=vllm can return them): no extra forward in training;
* ``precompute``: one no-grad pass over all pairs before the first step (what
  irpo.training.torch_trainer does, and TRL's ``precompute_ref_log_probs``);
* ``per_step``: a second, frozen copy of the model run forward inside every step (TRL's
  default).

All three use the trainer's forward (chosen and rejected of a pair with the prompt run once,
irpo.training.shared_prefix) and the same loss, clipping and AdamW, alternated over repeats
(order rotated). Writes benchmarks/results/ref_logprobs.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = ("sampler", "precompute", "per_step")


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    n = now()
    return n[0] - t[0], n[1] - t[1]


def ref_pass(model, toks, pad_id: int, batch_size: int):
    """The precompute pass: the reference log-probs of every pair, in order."""
    import torch

    from irpo.training.shared_prefix import pair_logprobs

    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(toks), batch_size):
            part = toks[start : start + batch_size]
            logps, _ = pair_logprobs(model, part, pad_id)
            chosen.append(logps[: len(part)])
            rejected.append(logps[len(part) :])
    model.train()
    return torch.cat(chosen), torch.cat(rejected)


def iteration(variant: str, model_dir: Path, toks, pad_id: int, sampler_refs, args) -> dict:
    """One epoch of training with the reference log-probs from ``variant``; times in (wall, CPU)."""
    import torch

    from irpo.losses import preference_loss
    from irpo.modeling import load_model
    from irpo.training.shared_prefix import pair_logprobs

    torch.manual_seed(0)
    model, _ = load_model(model_dir)
    ref_model = None
    ref_time = [0.0, 0.0]
    t0 = now()
    if variant == "sampler":
        refs = sampler_refs  # arrived with the samples
    elif variant == "precompute":
        refs = ref_pass(model, toks, pad_id, args.batch_size)
        ref_time = list(since(t0))
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        refs = None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for start in range(0, len(toks), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(toks))))
        micro, b = [toks[i] for i in idx], len(idx)
        if ref_model is not None:
            t = now()
            with torch.no_grad():
                r, _ = pair_logprobs(ref_model, micro, pad_id)
            ref_chosen, ref_rejected = r[:b], r[b:]
            dt = since(t)
            ref_time = [ref_time[0] + dt[0], ref_time[1] + dt[1]]
        else:
            ref_chosen, ref_rejected = refs[0][idx], refs[1][idx]
        logps, lengths = pair_logprobs(model, micro, pad_id)
        out = preference_loss(logps[:b], lengths[:b], args.beta, args.alpha, policy_rejected=logps[b:],
                              ref_chosen=ref_chosen, ref_rejected=ref_rejected)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = since(t0)
    if ref_model is not None:  # a second copy of the weights
        extra_bytes = sum(p.numel() * p.element_size() for p in ref_model.parameters())
    else:  # two float32 per pair
        extra_bytes = 2 * 4 * len(toks)
    # Same data, order and initial model: every variant should end at the same loss.
    return {"total": list(total), "ref": ref_time, "extra_memory_bytes": extra_bytes,
            "last_loss": float(out.loss)}


def summarise(runs: dict[str, list[dict]], pairs: int) -> dict:
    out = {}
    for v, rs in runs.items():
        out[v] = {}
        for i, clock in enumerate(("wall", "cpu")):
            total = statistics.median(r["total"][i] for r in rs)
            out[v][clock] = {"iteration_s": total, "ref_s": statistics.median(r["ref"][i] for r in rs),
                             "pairs_per_s": pairs / total}
        out[v]["extra_memory_mib"] = rs[0]["extra_memory_bytes"] / 2**20
    for v, rs in runs.items():  # per-repeat ratios: the runs of one repeat ran back to back
        for i, clock in enumerate(("wall", "cpu")):
            out[v][clock]["time_vs_sampler"] = statistics.median(
                p["total"][i] / s["total"][i] for p, s in zip(rs, runs["sampler"]))
        out[v]["last_loss"] = rs[0]["last_loss"]
        out[v]["last_loss_vs_sampler"] = out[v]["last_loss"] - runs["sampler"][0]["last_loss"]
    return out


def markdown(result: dict) -> str:
    w = result["work"]
    out = ["# Reference log-probs: from the sampler, a precompute pass, or a forward every step", "",
           "Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ref_logprobs.py`; numbers in "
           "`ref_logprobs.json`. One iteration-equivalent = one epoch of rpo training over "
           f"{w['pairs']} pairs (batch {w['batch_size']}, {w['prompt_tokens']} prompt + "
           f"{w['response_tokens']} response tokens each) on the {w['model_parameters'] / 1e6:.1f}M-"
           f"parameter benchmark model, fp32, {w['threads']} thread; medians of {w['repeats']} "
           f"alternated repeats on a CPU shared with other jobs ({w['cpu']}).", "",
           "| reference log-probs from | iteration s (wall / CPU) | of which reference s (wall / CPU) "
           "| time ÷ sampler's (wall / CPU) | extra memory | loss after the epoch |", "|---|---|---|---|---|---|"]
    for v, s in result["summary"].items():
        mem = s["extra_memory_mib"]
        mem_s = f"{mem:.1f} MiB (a second model)" if v == "per_step" else f"{mem * 1024:.1f} KiB (2 floats/pair)"
        out.append(f"| {v} | {s['wall']['iteration_s']:.1f} / {s['cpu']['iteration_s']:.1f} | "
                   f"{s['wall']['ref_s']:.1f} / {s['cpu']['ref_s']:.1f} | "
                   f"{s['wall']['time_vs_sampler']:.2f} / {s['cpu']['time_vs_sampler']:.2f} | {mem_s} | "
                   f"{s['last_loss']:.5f} |")
    out += ["", "With one epoch per iteration (the default) a precompute pass and a per-step reference "
            "forward do the same FLOPs (one forward per pair); the precompute pass runs without autograd "
            "state and needs no second model in memory. With E epochs the per-step forward is paid E "
            "times, the pass once. Taking them from the sampler removes the forward altogether "
            "(the policy step is 3 forward-equivalents, the reference 1, so at most 1/4 of the "
            "iteration): its cost moves into sampling, where the sampler computes the log-probs of "
            "the tokens it draws anyway (not measured here; see the sampling benchmark). It does not "
            "cover gold CoTs added to the winners, which still need a forward, and it needs the "
            "sampler's log-probs of the unmodified (temperature-1) distribution and a check against a "
            "recomputed forward (DESIGN.md §3).", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "train_step")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ref_logprobs"))
    args = ap.parse_args()
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    from bench_inputs import build_inputs
    from train_step import machine_info

    from irpo.modeling import load_model
    from irpo.training.data import tokenize_examples

    inputs = build_inputs(args.workdir, args.pairs)
    model, tok = load_model(inputs.model_dir)
    toks, _ = tokenize_examples(tok, inputs.pairs, 10**6)
    sampler_refs = ref_pass(model, toks, tok.pad_token_id, args.batch_size)  # stands in for the sampler's
    del model
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS[r % 3:] + VARIANTS[: r % 3]:
            runs[v].append(iteration(v, inputs.model_dir, toks, tok.pad_token_id, sampler_refs, args))
            print(f"repeat {r} {v}: {runs[v][-1]['total'][0]:.1f} s", flush=True)
    machine = machine_info(threads)
    result = {"work": {"pairs": args.pairs, "batch_size": args.batch_size, "threads": threads,
                       "repeats": args.repeats, "prompt_tokens": inputs.prompt_tokens,
                       "response_tokens": inputs.response_tokens, "model_parameters": inputs.num_parameters,
                       "cpu": machine["cpu"]},
              "machine": machine, "summary": summarise(runs, args.pairs), "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
