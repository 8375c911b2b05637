"""Throughput of the answer checkers at two commits, measured side by side on this machine.

    .venv/bin/python benchmarks/checkers_ab.py --old <commit> [--new WORKTREE] [--rounds 3]

On a shared machine a throughput number from another day says little; this runs the old and
the new checker code alternately in the same minutes (old, new, old, new, ...), each in its own
process (in ABBA order), and reports the median and the best checks/s of each and the ratios
new/old; on a loaded machine the best of several runs is the least disturbed estimate. The old code is taken
with ``git archive`` into a temporary folder (nothing in the work tree changes). What is timed
is ``benchmarks/checkers.py``'s false-positive loop of that commit: GSM8K and ARC on 20,000
pairs, MATH on ``--math-pairs`` pairs in one thread and in two.
Writes ``benchmarks/results/checkers_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from measure import load  # benchmarks/: this script's folder

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from benchmarks import checkers as c
from irpo.tasks import build_task
from irpo.tasks.__main__ import dataset_config
from irpo.tasks.gsm8k import parse_number
from irpo.tasks.math import hendrycks_equiv
try:
    from irpo.tasks.math import check_pool as pool
except ImportError:  # a commit from before the pool was made by its client
    from irpo.tasks.timeout import pool
data, pairs, math_pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def build(name):
    cfg = dataset_config(name, data); cfg.valid_size = 0; return build_task(cfg)
out = {}
gsm = build("gsm8k")
out["gsm8k"] = c.false_positives(gsm, gsm.load_split("test"), pairs, 0,
    lambda a, b: parse_number(a) == parse_number(b), lambda ex, rng: ex.gold_cot, c.Timer())["checks_per_s"]
arc = build("arc_challenge")
out["arc_challenge"] = c.false_positives(arc, arc.load_split("test"), pairs, 0, lambda a, b: a == b,
    c.arc_response, c.Timer())["checks_per_s"]
pool().warm()
mth = build("math"); test = mth.load_split("test")
for threads in (1, 2):
    out[f"math_{threads}_thread"] = c.false_positives(mth, test, math_pairs, 1, hendrycks_equiv,
        lambda ex, rng: ex.gold_cot, c.Timer(), threads=threads)["checks_per_s"]
print(json.dumps(out))
"""


def export(commit: str, into: Path) -> Path:
    """The commit's irpo/, benchmarks/ and conf/ under ``into`` (via git archive)."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", commit, "irpo", "benchmarks", "conf"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(tree: Path, data: str, pairs: int, math_pairs: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, data, str(pairs), str(math_pairs)],
                          cwd=tree, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="commit with the old checker code")
    p.add_argument("--new", default=str(REPO), help="tree with the new code (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--math-pairs", type=int, default=2000)
    p.add_argument("--data-dir", default=os.environ.get("IRPO_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checkers_ab.json"))
    args = p.parse_args()
    runs: dict = {"old": [], "new": []}
    loads = [load()]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": export(args.old, Path(tmp)), "new": Path(args.new)}
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):  # ABBA: drift cancels
                runs[name].append(measure(trees[name], args.data_dir, args.pairs, args.math_pairs))
                loads.append(load())
    keys = list(runs["old"][0])
    median = {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in runs}
    best = {n: {k: max(r[k] for r in runs[n]) for k in keys} for n in runs}  # least disturbed
    result = {"old_commit": args.old, "rounds": args.rounds, "pairs": args.pairs,
              "math_pairs": args.math_pairs, "cpus": os.cpu_count(), "loadavg": loads,
              "runs": runs, "median_checks_per_s": median, "best_checks_per_s": best,
              "ratio_new_over_old": {k: median["new"][k] / median["old"][k] for k in keys},
              "ratio_of_best": {k: best["new"][k] / best["old"][k] for k in keys}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k in keys:
        print(f"{k}: median old {median['old'][k]:.0f}/s, new {median['new'][k]:.0f}/s, ratio "
              f"{result['ratio_new_over_old'][k]:.3f}; best old {best['old'][k]:.0f}/s, new "
              f"{best['new'][k]:.0f}/s, ratio {result['ratio_of_best'][k]:.3f}")


if __name__ == "__main__":
    main()
