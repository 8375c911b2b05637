"""Measure the answer checkers of gsm8k, math and arc_challenge on the real data.

    .venv/bin/python benchmarks/checkers.py [--data-dir DIR] [--pairs 20000] [--seed 0]

Writes ``benchmarks/results/checkers.json`` (every number) and ``checkers.md`` (a summary):

* self-agreement: each record's gold CoT (ARC: its gold letter written in every answer format
  the extractor supports) must pass ``is_correct`` against its own gold; MATH500's ``answer``
  field is checked against the boxed answer of its ``solution``. MATH is also measured with the
  identical-string shortcut bypassed (math-verify / normalisation only) and on rewritten but
  equal golds (``\\dfrac``, no spaces, ``$...$`` instead of ``\\boxed``), which is closer to
  what a model writes.
* false positives: the gold response of problem i checked against the gold answer of a random
  problem j != i; a "correct" is an error only when the two golds are not truly equal (GSM8K:
  equal rationals; ARC: same letter; MATH: identical after the MATH repository's normalisation
  -- every remaining hit is listed for a human to judge).
* throughput (checks/s, one thread; MATH also with 2 threads) and the slowest single check,
  adversarial inputs included.

Data: ``--data-dir``, else ``$IRPO_DATA_DIR`` (the product's data root: one folder per task).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import load

from irpo.tasks import build_task
from irpo.tasks import math as math_task
from irpo.tasks.__main__ import dataset_config
from irpo.tasks.common import read_jsonl
from irpo.tasks.gsm8k import parse_number
from irpo.tasks.math import check_pool as pool
from irpo.tasks.math import hendrycks_equiv, last_boxed

ARC_FORMATS = (
    "Final answer: ({L})", "Final answer: {L}", "Final Answer: **{L}**", "final answer is {L}.",
    "Final answer: ({L}) {text}", "The answer is {L}.", "The answer is ({L})", "Answer: {L}",
    "So the correct answer is option {L}.", "Therefore we pick ({L})", "The best choice is {L}.",
)
ADVERSARIAL = (
    "\\boxed{" * 10000, "\\boxed{" * 10000 + "1" + "}" * 10000, "\\boxed{" + "9" * 100000 + "}",
    "Final answer: " + "9" * 100000, "\\boxed{10^{10^{10^{10}}}}", "\\boxed{9^{9^{9}}}",
    "\\boxed{1000000!}", "\\boxed{2^{2^{30}}}", "\\boxed{\\sum_{n=1}^{10^{10}} n^{n}}",
    "\\boxed{\\int_0^{10^{9}} x^{x} dx}", "Final answer: __import__('os').system('touch /tmp/pwned')",
    "\\boxed{__import__('os').system('touch /tmp/pwned')}", "(" * 50000 + "Final answer: (A)",
    "Final answer: " + "1," * 50000, "\\frac{" * 5000 + "Final answer: 3",
)


class Timer:
    """Wall time of every check, so the slowest one can be reported."""

    def __init__(self) -> None:
        self.max_s, self.n, self.slowest = 0.0, 0, None

    def check(self, task, response: str, gold: str) -> bool:
        start = time.perf_counter()
        ok = task.is_correct(response, gold)
        took = time.perf_counter() - start
        if took > self.max_s:
            self.max_s, self.slowest = took, {"response_end": response[-120:], "gold": gold[:120]}
        self.n += 1
        return ok


def self_agreement(task, examples, timer, responses=None) -> dict:
    failures = []
    for k, ex in enumerate(examples):
        response = responses[k] if responses else ex.gold_cot
        if not timer.check(task, response, ex.gold_answer):
            failures.append({"id": ex.id, "gold": ex.gold_answer,
                             "extracted": task.extract_answer(response)})
    n = len(examples)
    return {"n": n, "passed": n - len(failures), "rate": (n - len(failures)) / n,
            "exceptions": failures}


def math_without_shortcut(golds: list[tuple[str, str, str]]) -> dict:
    """(id, pred, gold) through the worker only: math-verify, else normalisation."""
    fails = []
    for rec_id, pred, gold in golds:
        try:
            ok = bool(pool().call("math_equal", pred, gold))
        except Exception as err:  # noqa: BLE001  # a timeout here is a finding, not a crash
            ok = False
            pred = f"{pred} ({type(err).__name__})"
        if not ok:
            fails.append({"id": rec_id, "pred": pred, "gold": gold})
    n = len(golds)
    return {"n": n, "passed": n - len(fails), "rate": (n - len(fails)) / n, "exceptions": fails}


def math_variants(gold: str) -> list[str]:
    """Model-style responses whose answer is a rewrite of ``gold`` that means the same thing."""
    out = [] if "\n" in gold else [f"Final answer: ${gold}$"]  # the answer line is one line
    if "\\frac" in gold:
        out.append("\\boxed{" + gold.replace("\\frac", "\\dfrac") + "}")
    if " " in gold and "\\text" not in gold and "\\ " not in gold:  # spaces matter there
        out.append("\\boxed{" + gold.replace(" ", "") + "}")
    return out


def false_positives(task, examples, pairs, seed, truly_equal, response_of, timer,
                    threads=1) -> dict:
    math_task._VERDICTS.clear()  # measure checks, not the verdict cache
    rng = random.Random(seed)
    todo = []
    for _ in range(pairs):
        i, j = rng.sample(range(len(examples)), 2)
        todo.append((examples[i], examples[j]))

    def one(pair):
        a, b = pair
        return a, b, timer.check(task, response_of(a, rng_for(a, b)), b.gold_answer)

    def rng_for(a, b):
        return random.Random(f"{seed}-{a.id}-{b.id}")

    start = time.perf_counter()
    if threads == 1:
        results = [one(p) for p in todo]
    else:
        with ThreadPoolExecutor(threads) as ex:
            results = list(ex.map(one, todo))
    took = time.perf_counter() - start
    hits = [(a, b) for a, b, ok in results if ok]
    errors = [(a, b) for a, b in hits if not truly_equal(a.gold_answer, b.gold_answer)]
    return {
        "pairs": pairs, "threads": threads, "checks_per_s": pairs / took,
        "accepted": len(hits), "accepted_truly_equal": len(hits) - len(errors),
        "errors": len(errors), "error_rate": len(errors) / pairs,
        "error_examples": [{"response_of": a.id, "response_gold": a.gold_answer,
                            "checked_against": b.id, "gold": b.gold_answer} for a, b in errors],
    }


def gold_text(ex) -> str:
    """The text of the gold option, as the prompt shows it."""
    return ex.question.split(f"\n({ex.gold_answer}) ", 1)[1].split("\n", 1)[0]


def arc_response(ex, rng) -> str:
    fmt = rng.choice(ARC_FORMATS)
    return "Some reasoning.\n" + fmt.format(L=ex.gold_answer, text=gold_text(ex))


def run(data_dir: str, pairs: int, seed: int) -> dict:
    os.environ["IRPO_DATA_DIR"] = data_dir
    out: dict = {"data_dir": data_dir, "pairs": pairs, "seed": seed, "cpus": os.cpu_count(),
                 "loadavg_start": load()}  # other jobs on the machine slow the checks
    timers = {name: Timer() for name in ("gsm8k", "math", "arc_challenge")}

    def build(name, **over):
        cfg = dataset_config(name, data_dir)
        for k, v in over.items():
            setattr(cfg, k, v)
        return build_task(cfg)

    # GSM8K ---------------------------------------------------------------------------
    gsm = build("gsm8k", valid_size=0)
    t = timers["gsm8k"]
    out["gsm8k"] = {"self_agreement": {s: self_agreement(gsm, gsm.load_split(s), t)
                                       for s in ("train", "test")}}
    out["gsm8k"]["false_positives"] = false_positives(
        gsm, gsm.load_split("test"), pairs, seed,
        lambda a, b: parse_number(a) == parse_number(b), lambda ex, rng: ex.gold_cot, t)

    # MATH ----------------------------------------------------------------------------
    pool().warm()  # worker start-up (~0.5 s, once per process) is not a check
    mth = build("math", valid_size=0)
    t = timers["math"]
    train, test = mth.load_split("train"), mth.load_split("test")
    sa = {s: self_agreement(mth, exs, t) for s, exs in (("train", train), ("test", test))}
    m500 = read_jsonl(Path(data_dir) / "math500" / "test.jsonl")
    m500_golds = [(r["unique_id"], r["answer"], last_boxed(r["solution"])) for r in m500]
    ex500 = build("math500").load_split("test")
    sa["math500_answer_vs_boxed"] = self_agreement(
        mth, ex500, t, responses=[f"Final answer: $\\boxed{{{a}}}$" for _, a, _ in m500_golds])
    sa["test_no_shortcut"] = math_without_shortcut([(e.id, e.gold_answer, e.gold_answer) for e in test])
    sa["math500_no_shortcut"] = math_without_shortcut(m500_golds)
    rewritten = [(e, v) for e in test for v in math_variants(e.gold_answer)]
    sa["test_rewritten_golds"] = self_agreement(mth, [e for e, _ in rewritten], t,
                                                responses=[v for _, v in rewritten])
    out["math"] = {"dropped_records": mth.dropped, "self_agreement": sa}
    fp1 = false_positives(mth, test, min(pairs, 2000), seed + 1, hendrycks_equiv,
                          lambda ex, rng: ex.gold_cot, t)
    fp = false_positives(mth, test, pairs, seed, hendrycks_equiv,
                         lambda ex, rng: ex.gold_cot, t, threads=2)
    fp["checks_per_s_1_thread"] = fp1["checks_per_s"]
    out["math"]["false_positives"] = fp

    # ARC -----------------------------------------------------------------------------
    arc = build("arc_challenge", valid_size=0)
    t = timers["arc_challenge"]
    out["arc_challenge"] = {"self_agreement": {}}
    for split in ("train", "test"):
        exs = arc.load_split(split)
        rows = [(ex, fmt) for ex in exs for fmt in ARC_FORMATS]
        responses = [fmt.format(L=ex.gold_answer, text=gold_text(ex)) for ex, fmt in rows]
        out["arc_challenge"]["self_agreement"][split] = self_agreement(
            arc, [ex for ex, _ in rows], t, responses=responses)
    out["arc_challenge"]["false_positives"] = false_positives(
        arc, arc.load_split("test"), pairs, seed, lambda a, b: a == b, arc_response, t)

    # Slowest single check, adversarial inputs included ---------------------------------
    tasks = {"gsm8k": gsm, "math": mth, "arc_challenge": arc}
    for name, task in tasks.items():
        adv = Timer()
        for text in ADVERSARIAL:
            for gold in ("5", "A", "10^{10^{10^{10}}}"):
                adv.check(task, text, gold)
        out[name]["max_check_s"] = timers[name].max_s
        out[name]["checks_timed"] = timers[name].n
        out[name]["slowest_check"] = timers[name].slowest
        out[name]["adversarial_max_check_s"] = adv.max_s
    out["pwned_marker_created"] = Path("/tmp/pwned").exists()
    out["loadavg_end"] = load()
    return out


def markdown(r: dict) -> str:
    load = "/".join(f"{x:.1f}" for x in r.get("loadavg_start", ())) or "not recorded"
    lines = [f"# Answer checkers on the real data (seed {r['seed']}, {r['cpus']} CPUs, load average "
             f"{load} at the start)", "",
             "Produced by `python benchmarks/checkers.py`; numbers in `checkers.json`.", "",
             "| task | check | n | passed | rate |", "|---|---|---|---|---|"]
    for task in ("gsm8k", "math", "arc_challenge"):
        for split, s in r[task]["self_agreement"].items():
            lines.append(f"| {task} | self-agreement {split} | {s['n']} | {s['passed']} | {s['rate']:.4%} |")
    lines += ["", ("| task | pairs | accepted | of which truly equal | errors | error rate | checks/s | "
                   "max check (s) | max on adversarial (s) |"), "|---|---|---|---|---|---|---|---|---|"]
    for task in ("gsm8k", "math", "arc_challenge"):
        fp = r[task]["false_positives"]
        rate = f"{fp['checks_per_s']:.0f}"
        if "checks_per_s_1_thread" in fp:
            rate = f"{fp['checks_per_s_1_thread']:.0f} (1 thread), {fp['checks_per_s']:.0f} (2 threads)"
        lines.append(f"| {task} | {fp['pairs']} | {fp['accepted']} | {fp['accepted_truly_equal']} | "
                     f"{fp['errors']} | {fp['error_rate']:.4%} | {rate} | {r[task]['max_check_s']:.3f} | "
                     f"{r[task]['adversarial_max_check_s']:.3f} |")
    lines += ["", "## Exceptions and errors", ""]
    for task in ("gsm8k", "math", "arc_challenge"):
        for split, s in r[task]["self_agreement"].items():
            for e in s["exceptions"]:
                lines.append(f"- {task} {split} `{e['id']}`: " + ", ".join(
                    f"{k} `{v}`" for k, v in e.items() if k != "id"))
        for e in r[task]["false_positives"]["error_examples"]:
            lines.append(f"- {task} false positive: response of `{e['response_of']}` (gold "
                         f"`{e['response_gold']}`) accepted for `{e['checked_against']}` (gold `{e['gold']}`)")
    if r["math"]["dropped_records"]:
        lines.append(f"- math records left out (empty `\\boxed{{}}`): {', '.join(r['math']['dropped_records'])}")
    lines.append(f"- planted side effect (/tmp/pwned) created: {r['pwned_marker_created']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("IRPO_DATA_DIR"),
                   help="data root with one folder per task (default: $IRPO_DATA_DIR)")
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checkers"))
    args = p.parse_args()
    if not args.data_dir:
        p.error("--data-dir: give the data root (one folder per task), or set IRPO_DATA_DIR")
    result = run(args.data_dir, args.pairs, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
