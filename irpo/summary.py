"""The per-iteration table printed at the end of a run (and saved as summary.md).

Built only from the stages' DONE markers, so a resumed run prints the same
table as an uninterrupted one.
"""

from __future__ import annotations

import math

from irpo.rundir import RunDir

STAGES = ("sample", "label", "data", "train", "eval")


def iteration_rows(run: RunDir, iterations: int) -> list[dict]:
    rows = []
    for t in range(iterations + 1):
        info = {s: run.done_info(t, s) or {} for s in STAGES}
        ev = info["eval"]
        maj = ev.get("test/maj_at_k", math.nan)
        rows.append({
            "iteration": t,
            "test_acc": ev.get("test/accuracy", math.nan),
            "maj": maj,
            "frac_correct": info["label"].get("frac_correct", math.nan),
            "examples": info["data"].get("data_examples", math.nan),
            "chosen_delta": info["train"].get("chosen_delta_end", math.nan),
            "rejected_delta": info["train"].get("rejected_delta_end", math.nan),
            **{f"{s}_s": info[s].get("wall_s", math.nan) for s in STAGES},
        })
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def render_table(rows: list[dict], maj_k: int) -> str:
    head = ["iter", "test acc", f"maj@{maj_k}", "correct samples", "train examples",
            "Δlogp chosen", "Δlogp rejected"] + [f"{s} s" for s in STAGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["iteration"]), _fmt(r["test_acc"], ".3f"), _fmt(r["maj"], ".3f"),
                 _fmt(r["frac_correct"], ".3f"), _fmt(r["examples"], "d") if r["examples"] == r["examples"] else "-",
                 _fmt(r["chosen_delta"], "+.2f"), _fmt(r["rejected_delta"], "+.2f")]
        cells += [_fmt(r[f"{s}_s"], ".1f") for s in STAGES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
