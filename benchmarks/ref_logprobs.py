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

And the training part of the same stage alone (from the start of the reference part to the
end of the last step: no model load, tokenisation or checkpoint), with the reference log-probs

* ``sampler``: from the sampler that generated the pairs (M(t-1) is both sampler and
  reference; sampler=vllm can return them), no check: no extra forward in training;
* ``precompute``: one no-grad pass over all pairs before the first step (what
  irpo.training.torch_trainer does without sampler values, and TRL's
  ``precompute_ref_log_probs``);
* ``per_step``: a second, frozen copy of the model run forward on every step's batch (TRL's
  default), by the trainer's ``on_step`` hook; the loss uses the sampler's values, which are
  the same numbers (the reference is the starting model), so only the cost is added.

Every variant is the real trainer (``train``), timed through its hooks (irpo.training.hooks:
``on_reference`` brackets the reference part, ``on_step`` marks each step), with its forward
(the packed layout), loss, clipping and AdamW, a constant learning rate without warm-up. All
variants alternate over repeats (order rotated). Writes benchmarks/results/ref_logprobs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Groups of variants; times in a group are compared with its first variant's.
GROUPS = {"trainer": ("trainer_sampler", "trainer_gold", "trainer_recompute"),
          "loop": ("sampler", "precompute", "per_step")}
VARIANTS = GROUPS["trainer"] + GROUPS["loop"]
# The loop group times the training part only; its variants run no agreement check.
CHECK_PAIRS = {"trainer_sampler": 8, "trainer_gold": 8, "trainer_recompute": 8,
               "sampler": 0, "precompute": 0, "per_step": 0}

from measure import clocks, load, since  # benchmarks/ is on the path now


def device():
    """Where every variant runs: the GPU if there is one (as the trainer's ``device=auto``)."""
    from irpo.modeling import resolve_device

    return resolve_device("auto")


def sampler_values(model_dir: Path, toks, pad_id: int, batch_size: int):
    """What the sampler would give: the trainer's own reference pass over every pair, in order."""
    from irpo.modeling import load_model
    from irpo.training.logprobs import reference_logprobs
    from irpo.training.torch_trainer import LAYOUT

    model, _ = load_model(model_dir, device=device())
    return reference_logprobs(model, toks, pad_id, batch_size, device=device(), show_progress=False,
                              layout=LAYOUT)


def given_examples(variant: str, pairs: list[dict], sampler_refs) -> list[dict]:
    """The pairs as the data stage writes them under ``variant`` (see the module docstring)."""
    if variant in ("trainer_recompute", "precompute"):
        return pairs
    chosen, rejected = sampler_refs[0].tolist(), sampler_refs[1].tolist()
    return [{**p, "chosen_ref_logprob": None if variant == "trainer_gold" and i % 2 == 0 else chosen[i],
             "rejected_ref_logprob": rejected[i]} for i, p in enumerate(pairs)]


def per_step_forward(model_dir: Path, toks, pad_id: int, cfg, ref_time: list[float]):
    """An ``on_step`` hook running a frozen second model forward on that step's batch (the
    trainer's batches: batch_order with the stage's seed 0), adding its time to ``ref_time``;
    and the bytes of that model."""
    import torch

    from irpo.modeling import load_model
    from irpo.training.logprobs import examples_logprobs
    from irpo.training.torch_trainer import LAYOUT, batch_order, plan_steps

    ref_model = load_model(model_dir, device=device())[0].eval().requires_grad_(False)
    batches = batch_order(len(toks), plan_steps(len(toks), cfg.trainer), cfg.trainer.batch_size, 0)

    def on_step(step: int, metrics: dict) -> None:
        t = clocks()
        with torch.no_grad():
            examples_logprobs(ref_model, [toks[i] for i in batches[step - 1]], pad_id, device(), LAYOUT)
        dt = since(t)
        ref_time[0] += dt[0]
        ref_time[1] += dt[1]

    return on_step, sum(p.numel() * p.element_size() for p in ref_model.parameters())


def trainer_stage(variant: str, model_dir: Path, pairs: list[dict], toks, pad_id: int,
                  sampler_refs, args) -> dict:
    """One call of the torch trainer's train() (the driver's train stage); times in (wall, CPU):
    the whole stage for the trainer group, its training part for the loop group."""
    from bench_inputs import rpo_config

    from irpo.training import torch_trainer
    from irpo.training.hooks import StageHooks

    cfg = rpo_config(model_dir, args, beta=args.beta, sampler="vllm", warmup_ratio=0.0,
                     schedule="constant", log_every=10**6, ref_check_pairs=CHECK_PAIRS[variant])
    marks: dict = {"steps": []}
    ref_time, extra_bytes, on_step = [0.0, 0.0], 2 * 4 * len(pairs), None  # two float32 per pair
    if variant == "per_step":
        on_step, extra_bytes = per_step_forward(model_dir, toks, pad_id, cfg, ref_time)
    losses = []

    def step_mark(step: int, metrics: dict) -> None:
        losses.append(metrics["train/loss"])
        if on_step is not None:
            on_step(step, metrics)
        marks["steps"].append(clocks())

    hooks = StageHooks(on_reference=lambda phase: marks.__setitem__(phase, clocks()), on_step=step_mark)
    out_dir = Path(tempfile.mkdtemp(prefix="ref-logprobs-"))
    try:
        t0 = clocks()
        info = torch_trainer.train(cfg, model_dir, given_examples(variant, pairs, sampler_refs),
                                   out_dir, lambda m, s: None, 0, 0, hooks=hooks)
        total = since(t0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if variant != "per_step":  # the reference part of the stage
        ref_time = [end - start for start, end in zip(marks["start"], marks["end"])]
    if variant in GROUPS["loop"]:  # from the reference part to the end of the last step
        total = tuple(end - start for start, end in zip(marks["start"], marks["steps"][-1]))
    return {"total": list(total), "ref": list(ref_time), "extra_memory_bytes": extra_bytes,
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
        out += ["## The training part: sampler, precompute pass, or a reference forward every step", "",
                "The same trainer from the start of its reference part to the end of its last step "
                "(no model load, tokenisation or checkpoint; timed by its hooks), no agreement check; "
                "the reference log-probs from the sampler (none computed), from one no-grad pass "
                "before the first step, or with a frozen second model run on every step's batch "
                "(TRL's default; by the on_step hook).", "", *loop_table(summary), ""]
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
    from irpo.training.torch_trainer import tokenize_for

    inputs = build_inputs(args.workdir, args.pairs)
    model, tok = load_model(inputs.model_dir)
    toks, _ = tokenize_for(model, tok, inputs.pairs)  # as the trainer does
    del model
    sampler_refs = sampler_values(inputs.model_dir, toks, tok.pad_token_id, args.batch_size)
    machine = machine_info(threads)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            runs[v].append(trainer_stage(v, inputs.model_dir, inputs.pairs, toks, tok.pad_token_id,
                                         sampler_refs, args))
            print(f"repeat {r} {v}: {runs[v][-1]['total'][0]:.1f} s wall, "
                  f"{runs[v][-1]['total'][1]:.1f} s CPU", flush=True)
    result = {"work": {"pairs": args.pairs, "batch_size": args.batch_size, "threads": threads,
                       "repeats": args.repeats, "prompt_tokens": inputs.prompt_tokens,
                       "response_tokens": inputs.response_tokens, "model_parameters": inputs.num_parameters,
                       "cpu": machine["cpu"], "load_average_end": load()},
              "machine": machine, "summary": summarise(runs, args.pairs), "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
