"""What the reference log-probs cost per iteration, on the training-step benchmark's work.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ref_logprobs.py [--pairs 96] [--repeats 3]
        [--variants trainer_sampler,trainer_gold,trainer_recompute,sampler,precompute,per_step]

One iteration-equivalent = one epoch of rpo training over the same pairs, batch 16, from the
same ~10M-parameter model (bench_inputs.py).

The train stage as the driver runs it: ``irpo.training.torch_trainer.train`` (model load,
tokenisation, reference log-probs through irpo.training.reference, the steps, the
checkpoint), timed whole, with its reference part timed inside, on the same pairs carrying

* ``trainer_sampler``: the sampler's log-prob of every response (sampler=vllm with
  return_logprobs; stood in for by the trainer's own values), so the trainer runs only the
  agreement check (trainer.ref_check_pairs = 8 pairs);
* ``trainer_gold``: the same, except for the chosen response of every other pair, as when the
  gold CoT is the first of 2 winners per prompt (the arithmetic default): those are scored
  as single responses;
* ``trainer_recompute``: none (any other sampler, or trainer.sampler_ref_logprobs=false):
  one reference pass over every pair.

And a bare training loop (the trainer's forward, loss, clipping and AdamW, without its
bookkeeping), with the reference log-probs taken

* ``sampler``: from the sampler that generated the pairs (M(t-1) is both sampler and
  reference; sampler=vllm can return them): no extra forward in training;
* ``precompute``: one no-grad pass over all pairs before the first step (what
  irpo.training.torch_trainer does, and TRL's ``precompute_ref_log_probs``);
* ``per_step``: a second, frozen copy of the model run forward inside every step (TRL's
  default).

The loop variants use the trainer's forward (chosen and rejected of a pair with the prompt
run once, irpo.training.shared_prefix) and the same loss, clipping and AdamW. All variants
alternate over repeats (order rotated). Writes benchmarks/results/ref_logprobs.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Groups of variants; times in a group are compared with its first variant's.
GROUPS = {"trainer": ("trainer_sampler", "trainer_gold", "trainer_recompute"),
          "loop": ("sampler", "precompute", "per_step")}
VARIANTS = GROUPS["trainer"] + GROUPS["loop"]


def device():
    """Where every variant runs: the GPU if there is one (as the trainer's ``device=auto``)."""
    from irpo.modeling import resolve_device

    return resolve_device("auto")


def now() -> tuple[float, float]:
    import torch

    if torch.cuda.is_available():  # the queued kernels belong to the interval being timed
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    n = now()
    return n[0] - t[0], n[1] - t[1]


def ref_pass(model, toks, pad_id: int, batch_size: int):
    """The precompute pass: the reference log-probs of every pair, in order."""
    import torch

    from irpo.training.shared_prefix import pair_logprobs

    model.eval()
    chosen, rejected, dev = [], [], device()
    with torch.no_grad():
        for start in range(0, len(toks), batch_size):
            part = toks[start : start + batch_size]
            logps, _ = pair_logprobs(model, part, pad_id, dev)
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
    dev = device()
    model, _ = load_model(model_dir, device=dev)
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
                r, _ = pair_logprobs(ref_model, micro, pad_id, dev)
            ref_chosen, ref_rejected = r[:b], r[b:]
            dt = since(t)
            ref_time = [ref_time[0] + dt[0], ref_time[1] + dt[1]]
        else:
            ref_chosen, ref_rejected = refs[0][idx], refs[1][idx]
        logps, lengths = pair_logprobs(model, micro, pad_id, dev)
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
            "last_loss": float(out.loss.detach())}


def trainer_examples(variant: str, pairs: list[dict], sampler_refs) -> list[dict]:
    """The pairs as the data stage writes them under ``variant`` (see the module docstring)."""
    if variant == "trainer_recompute":
        return pairs
    chosen, rejected = sampler_refs[0].tolist(), sampler_refs[1].tolist()
    return [{**p, "chosen_ref_logprob": None if variant == "trainer_gold" and i % 2 == 0 else chosen[i],
             "rejected_ref_logprob": rejected[i]} for i, p in enumerate(pairs)]


def trainer_stage(variant: str, model_dir: Path, pairs: list[dict], sampler_refs, args) -> dict:
    """One call of the torch trainer's train() (the driver's train stage); times in (wall, CPU)."""
    from bench_inputs import rpo_config

    from irpo.training import torch_trainer

    cfg = rpo_config(model_dir, args, beta=args.beta, sampler="vllm", warmup_ratio=0.0,
                     schedule="constant", log_every=10**6)
    examples = trainer_examples(variant, pairs, sampler_refs)
    ref_time, real = [0.0, 0.0], torch_trainer.stage_reference

    def timed(*a, **kw):  # the reference part of the stage
        t = now()
        out = real(*a, **kw)
        ref_time[:] = since(t)
        return out

    out_dir = Path(tempfile.mkdtemp(prefix="ref-logprobs-"))
    losses = []
    torch_trainer.stage_reference = timed
    try:
        t0 = now()
        info = torch_trainer.train(cfg, model_dir, examples, out_dir,
                                   lambda m, s: losses.append(m["train/loss"]), 0, 0)
        total = since(t0)
    finally:
        torch_trainer.stage_reference = real
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"total": list(total), "ref": list(ref_time), "extra_memory_bytes": 2 * 4 * len(pairs),
            "last_loss": losses[-1], **{k: v for k, v in info.items() if k.startswith("ref_")}}


def summarise(runs: dict[str, list[dict]], pairs: int) -> dict:
    out = {}
    for v, rs in runs.items():
        out[v] = {}
        for i, clock in enumerate(("wall", "cpu")):
            total = statistics.median(r["total"][i] for r in rs)
            out[v][clock] = {"iteration_s": total, "ref_s": statistics.median(r["ref"][i] for r in rs),
                             "pairs_per_s": pairs / total}
        out[v]["extra_memory_mib"] = rs[0]["extra_memory_bytes"] / 2**20
        out[v].update({k: val for k, val in rs[0].items() if k.startswith("ref_")})
    for group in GROUPS.values():
        base = next((v for v in group if v in runs), None)
        for v in (v for v in group if v in runs):  # per-repeat ratios: a repeat's runs ran back to back
            for i, clock in enumerate(("wall", "cpu")):
                out[v][clock]["time_vs_first"] = statistics.median(
                    p["total"][i] / s["total"][i] for p, s in zip(runs[v], runs[base]))
            out[v]["vs"] = base
            out[v]["last_loss"] = runs[v][0]["last_loss"]
            out[v]["last_loss_vs_first"] = out[v]["last_loss"] - runs[base][0]["last_loss"]
    return out


TRAINER_LABELS = {"trainer_sampler": "sampler, every response",
                  "trainer_gold": "sampler, but gold CoT winners (1 pair in 2)",
                  "trainer_recompute": "none: a reference pass over every pair"}


def _times(s: dict, key: str) -> str:
    return f"{s['wall'][key]:.2f} / {s['cpu'][key]:.2f}"


def trainer_table(summary: dict) -> list[str]:
    out = ["| reference log-probs given | responses from the sampler / computed | train stage s "
           "(wall / CPU) | of which reference s (wall / CPU) | time ÷ first row's (wall / CPU) "
           "| check: max abs diff | loss after the epoch |", "|---|---|---|---|---|---|---|"]
    for v in GROUPS["trainer"]:
        if v not in summary:
            continue
        s = summary[v]
        diff = s.get("ref_logprob_check_max_abs_diff")
        check = "-" if diff is None else f"{diff:.1e} ({s['ref_check_pairs']} pairs)"
        out.append(f"| {TRAINER_LABELS[v]} | {s['ref_rows_from_sampler']} / {s['ref_rows_computed']} | "
                   f"{_times(s, 'iteration_s')} | {_times(s, 'ref_s')} | {_times(s, 'time_vs_first')} | "
                   f"{check} | {s['last_loss']:.5f} |")
    return out


def loop_table(summary: dict) -> list[str]:
    out = ["| reference log-probs from | iteration s (wall / CPU) | of which reference s (wall / CPU) "
           "| time ÷ sampler's (wall / CPU) | extra memory | loss after the epoch |", "|---|---|---|---|---|---|"]
    for v in GROUPS["loop"]:
        if v not in summary:
            continue
        s = summary[v]
        mem = s["extra_memory_mib"]
        mem_s = f"{mem:.1f} MiB (a second model)" if v == "per_step" else f"{mem * 1024:.1f} KiB (2 floats/pair)"
        out.append(f"| {v} | {_times(s, 'iteration_s')} | {_times(s, 'ref_s')} | "
                   f"{_times(s, 'time_vs_first')} | {mem_s} | {s['last_loss']:.5f} |")
    return out


def markdown(result: dict) -> str:
    w, summary = result["work"], result["summary"]
    load = result["machine"]["load_average_start"]
    out = ["# Reference log-probs: from the sampler, a precompute pass, or a forward every step", "",
           "Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ref_logprobs.py`; numbers in "
           "`ref_logprobs.json`. One iteration-equivalent = one epoch of rpo training over "
           f"{w['pairs']} pairs (batch {w['batch_size']}, {w['prompt_tokens']} prompt + "
           f"{w['response_tokens']} response tokens each) on the {w['model_parameters'] / 1e6:.1f}M-"
           f"parameter benchmark model, fp32, {w['threads']} thread; medians of {w['repeats']} "
           f"alternated repeats on a CPU shared with other jobs ({w['cpu']}, {result['machine']['usable_cpus']} "
           f"cores, load average {load[0]:.1f} at the start, {w.get('load_average_end', [0])[0]:.1f} "
           "at the end: wall times are inflated by the contention, CPU times much less).", ""]
    if any(v in summary for v in GROUPS["trainer"]):
        out += ["## The train stage (irpo.training.torch_trainer.train)", "",
                "The whole stage as the driver runs it: model load, tokenisation, reference log-probs "
                "(irpo.training.reference), the steps and the checkpoint, on the same pairs; only the "
                "log-probs they carry differ. The sampler's values are stood in for by the trainer's "
                "own (computed once, before timing), so the check finds them equal and every row's "
                "loss is the same.", "", *trainer_table(summary), ""]
    if any(v in summary for v in GROUPS["loop"]):
        out += ["## A bare training loop: sampler, precompute pass, or a reference forward every step", "",
                "The trainer's forward, loss, clipping and AdamW without its bookkeeping, over the "
                "pairs in order; the reference log-probs from the sampler (none computed), from one "
                "no-grad pass before the first step, or from a frozen second model run in every step "
                "(TRL's default).", "", *loop_table(summary), ""]
    out += ["With one epoch per iteration (the default) a precompute pass and a per-step reference "
            "forward do the same FLOPs (one forward per pair); the precompute pass runs without autograd "
            "state and needs no second model in memory. With E epochs the per-step forward is paid E "
            "times, the pass once. Taking them from the sampler removes the forward for every response "
            "the sampler scored (the policy step is 3 forward-equivalents, the reference 1, so at most "
            "1/4 of the training); its cost moves into sampling, where the sampler computes the "
            "log-probs of the tokens it draws anyway (not measured here; see the sampling benchmark). "
            "Gold CoTs added to the winners still need a forward (one row each, without the shared "
            "prompt), and the agreement check recomputes trainer.ref_check_pairs pairs.",
            ""]
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
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    from bench_inputs import build_inputs
    from train_step import machine_info

    from irpo.modeling import load_model
    from irpo.training.data import tokenize_examples

    inputs = build_inputs(args.workdir, args.pairs)
    model, tok = load_model(inputs.model_dir, device=device())
    toks, _ = tokenize_examples(tok, inputs.pairs, 10**6)
    sampler_refs = ref_pass(model, toks, tok.pad_token_id, args.batch_size)  # stands in for the sampler's
    del model
    machine = machine_info(threads)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v in GROUPS["trainer"]:
                runs[v].append(trainer_stage(v, inputs.model_dir, inputs.pairs, sampler_refs, args))
            else:
                runs[v].append(iteration(v, inputs.model_dir, toks, tok.pad_token_id, sampler_refs, args))
            print(f"repeat {r} {v}: {runs[v][-1]['total'][0]:.1f} s wall, "
                  f"{runs[v][-1]['total'][1]:.1f} s CPU", flush=True)
    result = {"work": {"pairs": args.pairs, "batch_size": args.batch_size, "threads": threads,
                       "repeats": args.repeats, "prompt_tokens": inputs.prompt_tokens,
                       "response_tokens": inputs.response_tokens, "model_parameters": inputs.num_parameters,
                       "cpu": machine["cpu"], "load_average_end": os.getloadavg()},
              "machine": machine, "summary": summarise(runs, args.pairs), "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
