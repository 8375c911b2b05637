"""benchmarks/train_step.py ``--workload varlen``: the training stage on real pairs of varying length.

Run through train_step.py (see its docstring); this module holds the runs, the summary and the
Markdown. Sides alternate, each in its own subprocess (train_step_worker.py), the order
rotated per repeat; numbers are medians over the repeats, and ratios are medians of
per-repeat ratios (runs of one repeat ran back to back). Targets (the issue's): whole stage
>= 1.5x TRL's best configuration with reference log-probs from the sampler on our side
(``ours``) and precomputed on TRL's, >= 1.3x with a reference pass on both sides
(``ours_refpass`` against TRL's best), padding < 3%, and no more peak RSS above the
post-import baseline than the trainer before packing (``ours_padded``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from measure import load  # benchmarks/: this script's folder

SIDES = ("ours", "ours_refpass", "ours_padded", "trl", "trl_pre")
TRL = ("trl", "trl_pre")
LABELS = {
    "ours": "ours, reference log-probs from the sampler (the default run)",
    "ours_refpass": "ours, reference pass",
    "ours_padded": "ours before packing (padded shared-prefix layout), reference pass",
    "trl": "TRL DPOTrainer, reference forward every step",
    "trl_pre": "TRL DPOTrainer, `precompute_ref_log_probs=True`",
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    out = {"peak_rss_mib": med(r["peak_rss_mib"] for r in runs),
           "rss_after_import_mib": med(r["rss_after_import_mib"] for r in runs),
           "rss_above_import_mib": med(r["peak_rss_mib"] - r["rss_after_import_mib"] for r in runs)}
    for clock in ("wall", "cpu"):
        out[clock] = {"step_s": med(med(r[clock]["step_s"][1:]) for r in runs),
                      **{k: med(r[clock][k] for r in runs)
                         for k in ("stage_s", "setup_s", "ref_s", "after_steps_s")}}
        out[clock]["steps_s"] = med(sum(r[clock]["step_s"]) for r in runs)
    return out


def ratio(runs: dict, base: str, side: str) -> dict:
    """Median over repeats of side's time / base's time (> 1: base is faster)."""
    out = {}
    for clock in ("wall", "cpu"):
        step = [statistics.median(t[clock]["step_s"][1:]) / statistics.median(o[clock]["step_s"][1:])
                for o, t in zip(runs[base], runs[side])]
        stage = [t[clock]["stage_s"] / o[clock]["stage_s"] for o, t in zip(runs[base], runs[side])]
        out[clock] = {"step": statistics.median(step), "stage": statistics.median(stage),
                      "stage_range": [min(stage), max(stage)]}
    return out


def run_varlen(args, run_side) -> None:
    from bench_inputs import read_pairs
    from train_step import machine_info
    from train_step_varlen_inputs import build_varlen_inputs, padding

    t_start = time.perf_counter()
    load_before = uptime()
    machine = machine_info(args.threads)
    meta = build_varlen_inputs(args.workdir, args.pairs)
    pairs = read_pairs(args.workdir / "pairs.jsonl")
    pad = padding(args.workdir / "model", pairs, args.batch_size)
    sides = args.sides or list(SIDES)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for side in order:
            runs[side].append(run_side(side, args.workdir, args))
            print(f"repeat {r} {side}: stage {runs[side][-1]['wall']['stage_s']:.1f} s", flush=True)
    summary = {s: summarise(runs[s]) for s in sides}
    ratios = {base: {s: ratio(runs, base, s) for s in sides if s != base}
              for base in ("ours", "ours_refpass") if base in sides}
    trl = [s for s in TRL if s in sides]
    best = min(trl, key=lambda s: summary[s]["wall"]["stage_s"]) if trl else None
    targets = {}
    if best and {"ours", "ours_refpass"} <= set(sides):
        targets = {
            "trl_best_side": best,
            "stage_ours_sampler_refs_vs_trl_best": ratios["ours"][best]["wall"]["stage"],
            "stage_ours_refpass_vs_trl_best": ratios["ours_refpass"][best]["wall"]["stage"],
            "cpu_stage_ours_sampler_refs_vs_trl_best": ratios["ours"][best]["cpu"]["stage"],
            "cpu_stage_ours_refpass_vs_trl_best": ratios["ours_refpass"][best]["cpu"]["stage"],
            "padding_ours": pad["ours"],
        }
        targets["met"] = {"1.5x": targets["stage_ours_sampler_refs_vs_trl_best"] >= 1.5,
                          "1.3x": targets["stage_ours_refpass_vs_trl_best"] >= 1.3,
                          "padding<3%": pad["ours"] < 0.03}
        if "ours_padded" in sides:
            targets["met"]["memory<=before"] = (summary["ours"]["rss_above_import_mib"]
                                                <= summary["ours_padded"]["rss_above_import_mib"])
    result = {"machine": {**machine, "load_average_end": load(), "uptime_before": load_before,
                          "uptime_after": uptime()},
              "work": {**meta, "batch_size": args.batch_size, "lr": args.lr, "alpha": args.alpha,
                       "beta": 0.1, "dtype": "float32", "steps_per_run": -(-args.pairs // args.batch_size)},
              "padding": pad, "summary": summary, "ratios": ratios, "targets": targets, "runs": runs,
              "benchmark_wall_s": time.perf_counter() - t_start}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    Path(args.out + ".md").write_text(text)
    print(text)


def markdown(r: dict) -> str:
    m, w, pad, s = r["machine"], r["work"], r["padding"], r["summary"]
    lengths = pad["lengths"]
    rows = ["| side | padding | step s (wall / CPU) | whole stage s (wall) | setup / ref / steps / save s "
            "| side ÷ ours, stage (wall / CPU) | side ÷ ours_refpass, stage (wall / CPU) | peak RSS MiB "
            "| above post-import MiB |", "|---|" + "---|" * 8]
    for side, x in s.items():
        wall, cpu = x["wall"], x["cpu"]
        vs_ours = r["ratios"].get("ours", {}).get(side)
        vs_ref = r["ratios"].get("ours_refpass", {}).get(side)
        ours_col = f"{vs_ours['wall']['stage']:.2f} / {vs_ours['cpu']['stage']:.2f}" if vs_ours else "1"
        ref_col = f"{vs_ref['wall']['stage']:.2f} / {vs_ref['cpu']['stage']:.2f}" if vs_ref else "1"
        rows.append(
            f"| {LABELS[side]} | {pad[side]:.1%} | {wall['step_s']:.3f} / {cpu['step_s']:.3f} | "
            f"{wall['stage_s']:.1f} | {wall['setup_s']:.1f} / {wall['ref_s']:.1f} / {wall['steps_s']:.1f} / "
            f"{wall['after_steps_s']:.1f} | {ours_col} | {ref_col} | "
            f"{x['peak_rss_mib']:.0f} | {x['rss_above_import_mib']:.0f} |")
    t = r.get("targets", {})
    out = [
        "# Training stage on real variable-length pairs: ours against TRL's DPOTrainer", "",
        "Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py --workload varlen`; "
        "every number in `train_step_varlen.json`.", "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable cores shared with other jobs, {m['threads']} "
        f"torch thread(s); torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}. "
        f"`uptime` before: `{m['uptime_before']}`; after: `{m['uptime_after']}`.", "",
        f"Work: the {w['num_parameters'] / 1e6:.1f}M-parameter random Llama of the fixed-length "
        f"benchmark, fp32, trained one epoch on {w['pairs']} pairs in {w['steps_per_run']} steps of "
        f"{w['batch_size']}; lr {w['lr']:g}, beta {w['beta']}, alpha {w['alpha']:g}. The pairs are the "
        f"default run's first iteration: the built-in model M0 sampled {w['samples_per_prompt']} "
        f"responses to each of {w['prompts_sampled']} arithmetic training prompts (temperature "
        f"{w['temperature']:g}, at most {w['max_new_tokens']} tokens), labelled by the task's checker, "
        f"paired by irpo.pairs ({w['pairs_per_prompt']} per prompt, gold CoT among the winners). "
        f"Prompts {lengths['prompt_tokens_mean']:.1f} tokens on average ({lengths['prompt_tokens_range'][0]}"
        f"-{lengths['prompt_tokens_range'][1]}), responses {lengths['response_tokens_mean']:.1f} "
        f"({lengths['response_tokens_range'][0]}-{lengths['response_tokens_range'][1]}).", "",
        *rows, "",
        f"Medians over {len(next(iter(r['runs'].values())))} alternated repeats, each side in its own "
        "process. *step*: steady-state optimiser step (each run's first left out); *whole stage*: "
        "the training call from start to saved model (load, tokenise, reference log-probs, one "
        "epoch, save); *ref*: the reference pass (ours with sampler log-probs: the 8-pair agreement "
        "check only). Ratios: the side's time ÷ ours (> 1: ours is faster); CPU: process CPU time, "
        "which other jobs on the shared cores distort less than wall time. Padding: share of the token positions the "
        "forward computes that are padding, over one epoch of batches (TRL's prompt, run once per "
        "response, is not counted as padding); packed, ours has none at token level, its attention "
        "pads each score matrix to the batch's longest sequence as before.", "",
    ]
    if t:
        out += [f"Targets: whole stage ours ÷ TRL's best ({t['trl_best_side']}) = "
                f"{t['stage_ours_sampler_refs_vs_trl_best']:.2f} in wall time, "
                f"{t['cpu_stage_ours_sampler_refs_vs_trl_best']:.2f} in CPU time (target 1.5, "
                f"{'met' if t['met']['1.5x'] else 'NOT met'}); with a reference pass on our side "
                f"{t['stage_ours_refpass_vs_trl_best']:.2f} / {t['cpu_stage_ours_refpass_vs_trl_best']:.2f} "
                "(target 1.3, "
                f"{'met' if t['met']['1.3x'] else 'NOT met'}); padding {t['padding_ours']:.1%} (< 3%); "
                + (f"peak RSS above the post-import baseline {s['ours']['rss_above_import_mib']:.0f} MiB "
                   f"against {s['ours_padded']['rss_above_import_mib']:.0f} before packing "
                   f"({'met' if t['met']['memory<=before'] else 'NOT met'})." if "ours_padded" in s else ""), ""]
    out += [f"Benchmark wall time: {r['benchmark_wall_s'] / 60:.1f} min.", ""]
    return "\n".join(out)
