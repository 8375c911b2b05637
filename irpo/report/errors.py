"""Error analysis of runs from their run directories: what the accuracy numbers are made of.

For every run and iteration t (t = 0 is M0) it reads ``iter<t>/eval/predictions.jsonl``
(the greedy response to each test problem and the checker's verdict) and gives:

* **MATH accuracy by level and by subject** (``dataset=math``/``math500``): greedy accuracy
  over the test problems of each level 1-5 and each of the 7 subjects, from the records'
  ``level`` and ``type``/``subject`` fields (:meth:`irpo.tasks.math.MathTask.problem_meta`).
* **Checker agreement** on a seeded sample of the labelled predictions: the checker's verdict
  against a simple hand-written rule, written here apart from the task's checker:

  - ``gsm8k``, ``arith``: the last number anywhere in the response (commas dropped), equal
    as a number to the gold (lm-eval's "flexible extract");
  - ``arc_challenge``: the last option letter in parentheses, ``(A)``-``(E)``, equal to the gold;
  - ``math``: the content of the last ``\\boxed{...}``, with spaces, ``$``, ``\\left``/``\\right``,
    ``\\!`` and a closing period removed and ``\\dfrac``/``\\tfrac`` read as ``\\frac``, equal as
    a string to the gold so treated (strict: equal values written differently disagree).

  Reported: the share of checker-correct responses the rule calls wrong ("✓ → rule ✗") and of
  checker-wrong ones the rule calls right ("✗ → rule ✓"). Disagreements are where to look:
  an answer the checker read from the wrong place, or one the rule is too simple for.
* **Spot-check rows**: N seeded random test problems per run (the same problems at every
  iteration, so M0 and M(t) can be read side by side) as (prompt, chain of thought, answer,
  verdict) rows: a JSONL file per run and iteration and one Markdown and one HTML page, for
  the kind of hand check the paper did on 30 examples.

The task (prompts, answer extraction, MATH metadata) is rebuilt from the run's
``config.yaml``; a run directory that is not on this machine is listed as skipped.
"""

from __future__ import annotations

import html
import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from irpo.report.html import Section
from irpo.report.tables import Table, column

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"\(([A-E])\)")


def last_number_rule(response: str, gold: str) -> bool:
    """gsm8k/arith rule: the last number in the response equals the gold as a number."""
    found = _NUMBER.findall(response)
    if not found:
        return False
    try:
        return Fraction(found[-1].replace(",", "")) == Fraction(gold.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return False


def last_letter_rule(response: str, gold: str) -> bool:
    """arc_challenge rule: the last ``(X)`` option letter equals the gold letter."""
    found = _LETTER.findall(response)
    return bool(found) and found[-1] == gold.strip().strip("()")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced


def _strict(answer: str) -> str:
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("$", ""), (" ", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        answer = answer.replace(old, new)
    return answer.rstrip(".")


def boxed_rule(response: str, gold: str) -> bool:
    """math rule: the last ``\\boxed{}``'s content equals the gold after a few fixed rewrites."""
    boxed = _last_boxed(response)
    return boxed is not None and _strict(boxed) == _strict(gold)


RULES = {"gsm8k": last_number_rule, "arith": last_number_rule,
         "arc_challenge": last_letter_rule, "math": boxed_rule, "math500": boxed_rule}


@dataclass
class RunErrors:
    """The error analysis of one run directory."""

    label: str
    dataset: str
    by_level: dict[int, dict] = field(default_factory=dict)  # t -> {level: accuracy}
    by_subject: dict[int, dict] = field(default_factory=dict)  # t -> {subject: accuracy}
    agreement: dict[int, dict] = field(default_factory=dict)  # t -> counts
    rows: dict[int, list[dict]] = field(default_factory=dict)  # t -> spot-check rows


def task_of_run(run_dir: Path):
    """The run's task, rebuilt from its resolved config.yaml."""
    from irpo.tasks import build_task
    from irpo.tasks.arith import ArithConfig
    from irpo.tasks.common import HubTaskConfig

    raw = OmegaConf.load(run_dir / "config.yaml").dataset
    schema = ArithConfig if raw.name == "arith" else HubTaskConfig
    return build_task(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw)))


def _predictions(run_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for path in sorted(run_dir.glob("iter*/eval/predictions.jsonl")):
        t = int(path.parent.parent.name.removeprefix("iter"))
        if (path.parent / "DONE").exists():  # a finished evaluation only
            out[t] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return dict(sorted(out.items()))


def _accuracy_by(preds: list[dict], meta: dict[str, dict], key: str) -> dict:
    groups: dict = {}
    for p in preds:
        value = meta.get(p["id"], {}).get(key)
        if value is not None:
            groups.setdefault(value, []).append(bool(p["correct"]))
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(groups.items())}


def _agreement(preds: list[dict], rule, sample: int, rng: random.Random) -> dict:
    picked = preds if len(preds) <= sample else rng.sample(preds, sample)
    both = [(bool(p["correct"]), rule(p["greedy"], str(p["gold"]))) for p in picked]
    right = [r for c, r in both if c]
    wrong = [r for c, r in both if not c]
    return {"n": len(both), "agree": sum(c == r for c, r in both),
            "checker_right": len(right), "rule_wrong_of_right": sum(not r for r in right),
            "checker_wrong": len(wrong), "rule_right_of_wrong": sum(wrong)}


def analyse_run(run_dir: Path, label: str, n_rows: int = 20, sample: int = 500,
                seed: int = 0) -> RunErrors:
    """Breakdown, agreement and spot-check rows of every evaluated iteration of one run."""
    task = task_of_run(run_dir)
    preds = _predictions(run_dir)
    result = RunErrors(label, task.name)
    meta = task.problem_meta() if hasattr(task, "problem_meta") else {}
    examples = {e.id: e for e in task.load_split("test")}
    rule = RULES.get(task.name)
    first = next(iter(preds.values()), [])
    chosen = sorted(random.Random(f"{seed}:{label}").sample(
        range(len(first)), min(n_rows, len(first))))
    for t, records in preds.items():
        if meta:
            result.by_level[t] = _accuracy_by(records, meta, "level")
            result.by_subject[t] = _accuracy_by(records, meta, "subject")
        if rule is not None:
            result.agreement[t] = _agreement(records, rule, sample, random.Random(f"{seed}:{t}"))
        rows = []
        for i in chosen:
            p = records[i] if i < len(records) else None
            ex = examples.get(p["id"]) if p else None
            if ex is None:
                continue
            rows.append({"run": label, "iteration": t, "id": p["id"], "prompt": ex.prompt,
                         "question": ex.question, "chain_of_thought": p["greedy"],
                         "answer": task.extract_answer(p["greedy"]), "gold": p["gold"],
                         "verdict": bool(p["correct"]),
                         "rule_verdict": rule(p["greedy"], str(p["gold"])) if rule else None})
        result.rows[t] = rows
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def breakdown_table(runs: list[RunErrors], attr: str, title: str) -> Table | None:
    """Accuracy (%) by level or subject: one row per (run, iteration), one column per group."""
    cells, counts = {}, {}
    for r in runs:
        for t, groups in getattr(r, attr).items():
            cells[(r.label, t)] = {str(k): _pct(acc) for k, (acc, _) in groups.items()}
            counts.update({str(k): n for k, (_, n) in groups.items()})
    if not cells:
        return None
    frame = pd.DataFrame.from_dict(cells, orient="index").fillna("–")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["run", "t"])
    note = "Greedy test accuracy (%). Problems per column: " + ", ".join(
        f"{k} {n}" for k, n in counts.items()) + "."
    numbers = {(r.label, t): {g: acc for g, (acc, _) in groups.items()}
               for r in runs for t, groups in getattr(r, attr).items()}
    return Table(title, frame, note, numbers=numbers)


def agreement_table(runs: list[RunErrors], title: str) -> Table | None:
    cells = {}
    for r in runs:
        for t, a in r.agreement.items():
            cells[(r.label, t)] = {
                "sampled": str(a["n"]),
                "agree %": _pct(a["agree"] / a["n"]) if a["n"] else "–",
                "checker ✓ → rule ✗": (f"{a['rule_wrong_of_right']}/{a['checker_right']}"),
                "checker ✗ → rule ✓": (f"{a['rule_right_of_wrong']}/{a['checker_wrong']}"),
            }
    if not cells:
        return None
    frame = pd.DataFrame.from_dict(cells, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["run", "t"])
    note = ("The checker's verdict on a seeded sample of each iteration's greedy test responses "
            "against a hand-written rule (irpo/report/errors.py; docs/report.md): gsm8k/arith the "
            "last number, arc the last (X), math the last \\boxed{} compared strictly.")
    return Table(title, frame, note)


def write_spot_check(runs: list[RunErrors], out: Path) -> list[Path]:
    """``spot_check/<run>-iter<t>.jsonl`` per run and iteration, and spot_check.md / .html."""
    folder = out / "spot_check"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jsonl"):  # rows of an earlier build must not linger
        old.unlink()
    written, md, page = [], ["# Spot check: greedy test responses", ""], []
    for r in runs:
        for t, rows in r.rows.items():
            path = folder / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', r.label)}-iter{t}.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            written.append(path)
            md += [f"## {r.label}, iteration {t}", ""]
            page.append(f"<h2>{html.escape(r.label)}, iteration {t}</h2>")
            for row in rows:
                mark = "✓" if row["verdict"] else "✗"
                md += [f"### {row['id']} {mark} (answer {row['answer']!r}, gold {row['gold']!r})", "",
                       "**Question.** " + row["question"], "", "```", row["chain_of_thought"], "```", ""]
                page.append(
                    f"<h3>{html.escape(row['id'])} {mark} — answer {html.escape(repr(row['answer']))}, "
                    f"gold {html.escape(repr(row['gold']))}</h3><p>{html.escape(row['question'])}</p>"
                    f"<pre>{html.escape(row['chain_of_thought'])}</pre>")
    (out / "spot_check.md").write_text("\n".join(md) + "\n")
    (out / "spot_check.html").write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Spot check</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}</style></head><body>"
        "<h1>Spot check: greedy test responses</h1>\n" + "\n".join(page) + "\n</body></html>\n")
    return written


def error_sections(rs, lab: pd.Series, out: Path, n_rows: int = 20,
                   sample: int = 500) -> tuple[list[Section], list[tuple[str, str]]]:
    """The report's error-analysis sections (one per dataset) and its meta lines.

    ``rs``/``lab``: the report's runs and row labels (irpo.report); each run is read from
    its ``run_dir`` tag, labelled ``<row label> seed=<seed>``.
    """
    by_dataset: dict[str, list[RunErrors]] = {}
    skipped = []
    for run_id, run in rs.runs.iterrows():
        run_dir = Path(column(rs.runs, "tags.run_dir").loc[run_id])
        label = f"{lab.loc[run_id]} seed={column(rs.runs, 'tags.seed').loc[run_id]}"
        if not (run_dir / "config.yaml").is_file():
            skipped.append(label)
            continue
        r = analyse_run(run_dir, label, n_rows, sample)
        by_dataset.setdefault(r.dataset, []).append(r)
    sections = []
    for dataset, runs in sorted(by_dataset.items()):
        tables = [breakdown_table(runs, "by_level", f"MATH accuracy by level — {dataset}"),
                  breakdown_table(runs, "by_subject", f"MATH accuracy by subject — {dataset}"),
                  agreement_table(runs, f"Checker agreement — {dataset}")]
        if any(tables):
            sections.append(Section(f"Error analysis — {dataset}", [t for t in tables if t]))
    meta = []
    if by_dataset:
        runs = [r for rr in by_dataset.values() for r in rr]
        files = write_spot_check(runs, out)
        meta.append(("spot check", (f"spot_check.md, spot_check.html and {len(files)} JSONL files "
                                    f"in spot_check/ ({n_rows} test problems per run and iteration)")))
    if skipped:
        names = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        meta.append(("error analysis skipped",
                     f"{len(skipped)} runs whose run directory is not here: {names}"))
    return sections, meta
