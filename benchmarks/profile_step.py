"""Where a training step's time goes: torch.profiler over steady-state steps of each side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py [--workdir outputs/bench/train_step]

Uses the model and pairs that benchmarks/train_step.py built in ``--workdir`` (builds them if
missing), runs ours and TRL (with ``precompute_ref_log_probs``, the same FLOPs per step) under
the profiler (each in its own process), skips the first four steps, records three, and groups the operators' self CPU time
into matmul, attention, loss, elementwise/norm, optimiser and the rest; what no operator
accounts for is Python and framework overhead. Runs each side ``--repeats`` times, alternated,
and keeps its fastest run. Writes benchmarks/results/train_step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Profiler schedule in steps. The first steps page-fault while glibc's malloc adapts its mmap
# threshold to the activation sizes (~10^5 minor faults per step, none from the fourth on),
# so they are skipped; step 0 of the schedule is load + reference pass + step 1.
WAIT, WARMUP, ACTIVE = 3, 1, 3
CATEGORIES = (  # first match wins; names are aten operator names
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm)$"),
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("loss (log-softmax, logsumexp, gather)", r"logsumexp|log_softmax|_log_softmax|gather|logsigmoid"),
    ("elementwise, norms, activations, optimiser updates",
     r"^aten::(mul|add|sub|div|neg|silu|silu_backward|rsqrt|pow|mean|sum|cos|sin|cat|exp|where|"
     r"masked_fill|embedding_dense_backward|index_select|embedding|_foreach_\w+|\w+_)$"),
    ("copies, views, allocation", r"^aten::(copy_|clone|contiguous|empty\w*|zeros\w*|fill_|zero_|to|"
                                  r"_to_copy|transpose|view|reshape|t|expand|slice|select|unsqueeze|"
                                  r"as_strided|permute|resize_)$"),
)


def categorise(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other operators"


def profiled(run):
    """Run ``run(step_hook)`` under the profiler; ``step_hook`` is called at every step end."""
    from torch.profiler import ProfilerActivity, profile, schedule

    marks: list[tuple[float, int]] = []
    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1))

    def step_hook():
        marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
        prof.step()

    with prof:
        run(step_hook)
    first_active = WAIT + WARMUP - 1  # marks[i] is the end of step i+1
    wall = marks[first_active + ACTIVE][0] - marks[first_active][0]
    faults = marks[first_active + ACTIVE][1] - marks[first_active][1]
    averages = prof.key_averages()
    ops = [e for e in averages if e.key.startswith("aten::")]
    optimiser = sum(e.cpu_time_total for e in averages if e.key.startswith("Optimizer.step#"))
    by_cat: dict[str, float] = {}
    for e in ops:
        by_cat[categorise(e.key)] = by_cat.get(categorise(e.key), 0.0) + e.self_cpu_time_total / 1e6
    op_total = sum(by_cat.values())
    return {
        "wall_per_step_s": wall / ACTIVE,
        "categories_s_per_step": {k: v / ACTIVE for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "not_in_operators_s_per_step": (wall - op_total) / ACTIVE,
        "optimizer_step_total_s_per_step": optimiser / 1e6 / ACTIVE,
        "top_ops": merge_ops([{"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / ACTIVE,
                               "calls_per_step": e.count / ACTIVE} for e in ops])[:15],
        "operator_calls_per_step": sum(e.count for e in ops) / ACTIVE,
        "minor_page_faults_per_step": faults / ACTIVE,
    }


def merge_ops(rows: list[dict]) -> list[dict]:
    """One row per operator name (key_averages can split one name, e.g. by overload), slowest first."""
    merged: dict[str, dict] = {}
    for r in rows:
        m = merged.setdefault(r["op"], {"op": r["op"], "self_s_per_step": 0.0, "calls_per_step": 0.0})
        m["self_s_per_step"] += r["self_s_per_step"]
        m["calls_per_step"] += r["calls_per_step"]
    return sorted(merged.values(), key=lambda r: -r["self_s_per_step"])


def profile_ours(workdir: Path, pairs: list[dict], args) -> dict:
    def run(hook):
        from bench_inputs import rpo_config

        import irpo.training.torch_trainer as tt

        cfg = rpo_config(workdir / "model", args, beta=0.1)
        with tempfile.TemporaryDirectory() as tmp:
            tt.train(cfg, workdir / "model", pairs, Path(tmp), lambda m, s: hook(), 0, 0)

    return profiled(run)


def profile_trl(workdir: Path, pairs: list[dict], args) -> dict:
    from train_step_worker import make_trl_trainer
    from transformers import TrainerCallback

    def run(hook):
        class Hook(TrainerCallback):
            def on_step_end(self, *a, **kw):
                hook()

        with tempfile.TemporaryDirectory() as tmp:
            targs = argparse.Namespace(alpha=args.alpha, beta=0.1, lr=args.lr,
                                       batch_size=args.batch_size, seed=0)
            trainer, _ = make_trl_trainer("trl_pre", workdir / "model", pairs, targs, Path(tmp), [Hook()])
            trainer.train()

    return profiled(run)


def markdown(result: dict) -> str:
    out = ["# Where a training step's time goes (torch.profiler, CPU)", "",
           "Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py`: the "
           f"benchmark's model and pairs, batch {result['batch_size']}, {ACTIVE} steady-state steps "
           "per side under the profiler (which slows small operators down, so the overhead share is "
           "an upper bound), each side in its own process; of "
           f"{len(result['wall_per_step_all_runs']['ours'])} alternated runs per side the fastest is "
           "shown (other jobs share the cores). Seconds per step, operator self CPU time.", ""]
    sides = list(result["sides"])
    cats = []
    for s in sides:
        cats += [c for c in result["sides"][s]["categories_s_per_step"] if c not in cats]
    out += ["| | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for c in cats:
        out.append(f"| {c} | " + " | ".join(
            f"{result['sides'][s]['categories_s_per_step'].get(c, 0.0):.3f}" for s in sides) + " |")
    out.append("| not in any operator (Python, autograd engine, profiler) | " + " | ".join(
        f"{result['sides'][s]['not_in_operators_s_per_step']:.3f}" for s in sides) + " |")
    out.append("| **wall per step** | " + " | ".join(
        f"**{result['sides'][s]['wall_per_step_s']:.3f}**" for s in sides) + " |")
    out.append("| of which AdamW `optimizer.step()` (all its operators) | " + " | ".join(
        f"{result['sides'][s]['optimizer_step_total_s_per_step']:.3f}" for s in sides) + " |")
    out.append("| operator calls per step | " + " | ".join(
        f"{result['sides'][s]['operator_calls_per_step']:.0f}" for s in sides) + " |")
    out.append("| minor page faults per step | " + " | ".join(
        f"{result['sides'][s]['minor_page_faults_per_step']:.0f}" for s in sides) + " |")
    for s in sides:
        x = result["sides"][s]
        shares = ", ".join(f"{k} {v / x['wall_per_step_s']:.0%}" for k, v in x["categories_s_per_step"].items()
                           if v / x["wall_per_step_s"] >= 0.01)
        out += ["", f"{s}: {shares}, outside operators "
                    f"{x['not_in_operators_s_per_step'] / x['wall_per_step_s']:.0%} of the step."]
    for s in sides:
        out += ["", f"Top operators, {s}:", "", "| op | self s/step | calls/step |", "|---|---|---|"]
        out += [f"| `{t['op']}` | {t['self_s_per_step']:.3f} | {t['calls_per_step']:.0f} |"
                for t in merge_ops(result["sides"][s]["top_ops"])[:10]]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "train_step")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--side", choices=("ours", "trl_pre"), help="profile one side here (internal)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step_profile"))
    args = ap.parse_args()
    steps = WAIT + WARMUP + ACTIVE + 1
    need = steps * args.batch_size
    if args.side:  # one side in this fresh process: neither inherits the other's warm allocator
        import torch
        from bench_inputs import read_pairs

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        pairs = read_pairs(args.workdir / "pairs.jsonl")[:need]
        fn = profile_ours if args.side == "ours" else profile_trl
        Path(args.out).write_text(json.dumps(fn(args.workdir, pairs, args)))
        return
    from bench_inputs import build_inputs, read_pairs

    if not (args.workdir / "pairs.jsonl").exists() or len(read_pairs(args.workdir / "pairs.jsonl")) < need:
        build_inputs(args.workdir, need)
    result = {"batch_size": args.batch_size, "sides": {}, "wall_per_step_all_runs": {}}
    for _ in range(args.repeats):  # alternated; per side the least disturbed run is kept
        for side in ("ours", "trl_pre"):
            part = Path(args.out + f".{side}.json")
            cmd = [sys.executable, __file__, "--side", side, "--workdir", str(args.workdir),
                   "--out", str(part), "--batch-size", str(args.batch_size), "--alpha", str(args.alpha),
                   "--lr", str(args.lr)]
            subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            run = json.loads(part.read_text())
            part.unlink()
            result["wall_per_step_all_runs"].setdefault(side, []).append(run["wall_per_step_s"])
            if side not in result["sides"] or run["wall_per_step_s"] < result["sides"][side]["wall_per_step_s"]:
                result["sides"][side] = run
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
