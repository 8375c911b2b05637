"""The Markdown summary of benchmarks/train_step.py's JSON result.

    .venv/bin/python benchmarks/train_step_report.py benchmarks/results/train_step.json

re-renders ``train_step.md`` from the JSON (train_step.py calls :func:`markdown` itself),
with a before/after table when ``train_step_two_rows.json`` (the benchmark before the trainer
ran each pair's prompt once) lies next to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "ours": "ours (`irpo.training.torch_trainer.train`)",
    "trl": "TRL DPOTrainer, reference forward every step",
    "trl_pre": "TRL DPOTrainer, `precompute_ref_log_probs=True`",
    "trl_default": "TRL, reference every step, default gradient checkpointing",
}


def _machine(r: dict) -> list[str]:
    m, w, p = r["machine"], r["work"], r["matmul_peak"]
    each = ", ".join(f"{x['peak_gflops']:.0f}" for x in p["measurements"])
    sizes = ", ".join(f"{n}: {g:.0f}" for n, g in p["measurements"][0]["gflops_by_size"].items())
    gpu = f"GPU {m['gpu']} (every side trains on it), " if m.get("gpu") else ""
    where = "on the GPU" if m.get("gpu") else f"at {m['threads']} thread(s)"
    return [
        f"Machine: {gpu}{m['cpu']}, {m['usable_cpus']} usable cores shared with other jobs (load average "
        f"{m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end), "
        f"{m['threads']} torch thread(s); Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {m['trl']}.",
        "",
        f"fp32 matmul peak {where}: {p['used_gflops']:.1f} GFLOP/s "
        f"(the best of {len(p['measurements'])} measurements of square `torch.mm` spread over the "
        f"benchmark: {each}; the first by size {sizes}). Other jobs on the cores lower a "
        "measurement, never raise it.",
        "",
        f"Work: random-init Llama, {w['model_parameters'] / 1e6:.2f}M parameters ({w['layers']} layers, "
        f"hidden {w['hidden']}, head_dim {w['head_dim']}, vocab {w['vocab']}), fp32; "
        f"{w['pairs_per_run']} arithmetic pairs per run (one epoch, {w['steps_per_run']} steps of "
        f"{w['batch_size']} pairs), every sequence {w['prompt_tokens']} prompt + {w['response_tokens']} "
        f"response tokens (no padding on either side); lr {w['lr']:g}, linear schedule, 10% warm-up, "
        f"beta {w['beta']}, alpha {w['alpha']:g}. One forward over a batch = "
        f"{w['forward_gflops_per_batch']['two_rows']:.1f} GFLOP as two rows per pair (TRL), "
        f"{w['forward_gflops_per_batch']['shared_prefix']:.1f} GFLOP with each prompt run once (ours).",
    ]


def _table(r: dict) -> list[str]:
    rows = ["| side | step s (wall / CPU) | pairs/s (wall / CPU) | tokens/s (wall) | ours ÷ side, "
            "step throughput (wall / CPU) | stage s (wall) | ours ÷ side, stage (wall / CPU) | "
            "ref log-probs s | setup s | peak RSS MiB | step MFU (wall / CPU) | stage MFU (wall) |",
            "|---|" + "---|" * 11]
    for side, s in r["summary"].items():
        w, c = s["wall"], s["cpu"]
        rat = r["ratios_ours_over"].get(side)
        step_ratio = (f"{rat['wall']['step_throughput']:.2f} / {rat['cpu']['step_throughput']:.2f}"
                      if rat else "1")
        stage_ratio = (f"{rat['wall']['stage_throughput']:.2f} / {rat['cpu']['stage_throughput']:.2f}"
                       if rat else "1")
        rows.append(
            f"| {LABELS[side]} | {w['step_s']:.2f} / {c['step_s']:.2f} | {w['pairs_per_s']:.2f} / "
            f"{c['pairs_per_s']:.2f} | {w['tokens_per_s']:.0f} | {step_ratio} | {w['stage_s']:.1f} | "
            f"{stage_ratio} | {w['ref_s']:.1f} | {w['setup_s']:.1f} | {s['peak_rss_mib']:.0f} | "
            f"{w['step_mfu']:.0%} / {c['step_mfu']:.0%} | {w['stage_mfu']:.0%} |")
    return rows


def _checks(r: dict) -> list[str]:
    c = r["loss_checks"]
    keys = [k for k in c if k.startswith("alpha=")]
    rows = ["| alpha | " + " | ".join(LABELS[s].split(",")[0] + ("" if s == "ours" else f" ({s})")
                                      for s in c[keys[0]]) + " |",
            "|---|" + "---|" * len(c[keys[0]])]
    for k in keys:
        rows.append(f"| {k.split('=')[1]} | " + " | ".join(f"{v:.7f}" for v in c[k].values()) + " |")
    v = c["varlen"]
    t = c["tolerances"]
    return rows + [
        "",
        f"At alpha = 0 every side gives ln 2 = {c['ln2']:.7f} within {t['abs_at_alpha0']:g} "
        f"({'pass' if c['alpha0_ok'] else 'FAIL'}); at alpha > 0 they agree within a relative "
        f"{t['rel_at_alpha']:g} ({'pass' if c['alpha_ok'] else 'FAIL'}). One batch of 16 pairs, so "
        "both sides see the same batch.",
        "",
        "The `sft` term differs from ours when chosen lengths differ: TRL averages -log p over all "
        "chosen tokens of the batch (long responses weigh more); ours (the paper's) divides each "
        "response's NLL by its own length, then averages over pairs. On 16 pairs of mixed lengths, "
        f"TRL - ours = {v['trl_minus_ours']:.6f}; predicted alpha x (token mean {v['nll_token_mean']:.6f}"
        f" - sequence mean {v['nll_sequence_mean']:.6f}) = "
        f"{v['predicted_alpha_x_(token_mean_minus_sequence_mean)']:.6f} "
        f"({'pass' if v['ok'] else 'FAIL'} within {t['abs_varlen_prediction']:g}). The benchmark pairs "
        "all have one length, where the two coincide.",
    ]


def _before_after(r: dict, before: dict) -> list[str]:
    rows = ["| | ours step s (wall / CPU) | ours ÷ TRL (wall / CPU) | ours ÷ TRL precompute (wall / CPU) "
            "| ours stage ÷ TRL stage (CPU) |", "|---|---|---|---|---|"]
    for label, x in (("two rows per pair (before)", before), ("prompt once (now)", r)):
        o, rat = x["summary"]["ours"], x["ratios_ours_over"]
        rows.append(f"| {label} | {o['wall']['step_s']:.2f} / {o['cpu']['step_s']:.2f} | "
                    f"{rat['trl']['wall']['step_throughput']:.2f} / {rat['trl']['cpu']['step_throughput']:.2f} | "
                    f"{rat['trl_pre']['wall']['step_throughput']:.2f} / "
                    f"{rat['trl_pre']['cpu']['step_throughput']:.2f} | "
                    f"{rat['trl']['cpu']['stage_throughput']:.2f} |")
    return ["", "## Before and after running each pair's prompt once", "",
            "The same benchmark before the trainer ran a pair's prompt once (`train_step_two_rows.json`, "
            "commit 654c455: chosen and rejected as two full rows, like TRL) and now:", ""] + rows


NOTES = [
    "", "## Set-up differences and notes", "",
    "- TRL runs with `gradient_checkpointing=False` and `bf16=False`: its defaults are True "
    "(recomputing every layer's forward in the backward, ~1.33x the FLOPs) and bf16 autocast; "
    "ours never checkpoints unless `trainer.gradient_checkpointing=true`. Everything else is "
    "TRL's default, including AdamW as one fused kernel (`adamw_torch_fused`), as ours is too "
    "(`torch.optim.AdamW(fused=True)`: 0.009 s of a step, train_step_profile.md).",
    "- TRL's per-step extras: its fused LM head also computes entropy, mean logits and top-1 "
    "accuracy for its metrics, and it scores every position on CPU (no Triton); with a "
    "474-token vocabulary this is small.",
    "- Padding: none here by construction. On real batches TRL pads chosen and rejected rows to "
    "the longest prompt + response of the batch; ours packs each micro-batch into one row "
    "without padding (irpo/training/packing.py). `--workload varlen` measures real pairs "
    "(train_step_varlen.md).",
    "- With one epoch per iteration the reference pass (ours, `trl_pre`) and TRL's per-step "
    "reference forward do the same FLOPs, so whole-stage ratios are smaller than step ratios; "
    "the reference forward disappears when the sampler returns the log-probs (ref_logprobs.md).",
]


def markdown(r: dict, before: dict | None = None) -> str:
    out = ["# Training step: ours against TRL's DPOTrainer (RPO loss)", "",
           "Produced by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py`; every number "
           "in `train_step.json`.", ""]
    out += _machine(r) + ["", "## Throughput", ""] + _table(r)
    out += [
        "",
        f"Medians over {len(next(iter(r['runs'].values())))} alternated repeats (each side in its own "
        "subprocess, order rotated per repeat). *step* = steady-state optimiser step (the first "
        "step of each run left out), including one metrics log; *stage* = the whole training call "
        "(load, tokenise, reference log-probs, one epoch, save). Ratios > 1 mean ours is faster; "
        "they are medians of per-repeat ratios of back-to-back runs. CPU = process CPU time, which "
        "other jobs on the shared cores distort less than wall time. MFU counts the matmul FLOPs each "
        "side executes (policy forward + backward = 3 forwards, + 1 reference forward per pair: "
        "inside the step for TRL without precompute, in a separate pass otherwise; ours runs each "
        "pair's prompt once, so it executes fewer FLOPs for the same pairs) against the measured "
        "matmul peak.",
        "", "## First-step loss agreement", ""]
    out += _checks(r)
    if before is not None and {"trl", "trl_pre"} <= r["ratios_ours_over"].keys():
        out += _before_after(r, before)
    out += NOTES
    out += ["", f"Benchmark wall time: {r['benchmark_wall_s'] / 60:.1f} min.", ""]
    return "\n".join(out)


def load_before(out: Path) -> dict | None:
    """The two-rows baseline kept next to the results, if there (see _before_after)."""
    path = out.parent / "train_step_two_rows.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/train_step.json")
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text()), load_before(path)))
