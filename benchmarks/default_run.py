"""Measure the embedded default run: wall time per stage, peak memory, accuracy per iteration.

    python benchmarks/default_run.py --seeds 0 1 2 [--jobs 1] [--out benchmarks/results/default_run]

Runs ``python -m irpo.main seed=<s>`` once per seed (as a user would, in a subprocess)
into a fresh output root, from the shipped M0. Writes
``<out>.json`` (every number) and ``<out>.md`` (the tables for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from measure import load

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sample", "label", "data", "train", "eval")


def run_seed(seed: int, root: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "irpo.main", f"seed={seed}", f"output_root={root}", *extra]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}")
    wall = time.perf_counter() - t0
    run = max((root / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    rows = []
    t = 0
    while (run / f"iter{t}" / "eval" / "DONE").exists():
        row = {"iteration": t}
        for s in STAGES:
            done = run / f"iter{t}" / s / "DONE"
            if done.exists():
                info = json.loads(done.read_text())
                row[f"{s}_s"] = info["wall_s"]
                row.update({k: v for k, v in info.items() if k in (
                    "test/accuracy", "test/maj_at_k", "frac_correct", "data_examples",
                    "chosen_delta_end", "rejected_delta_end", "tokens_sampled")})
        rows.append(row)
        t += 1
    summary = (run / "summary.md").read_text()
    peak = float(summary.split("peak RSS: ")[1].split()[0])
    return {"seed": seed, "wall_s": round(wall, 1), "peak_rss_mib": peak, "rows": rows,
            "m0_build_s": _m0_seconds(proc.stdout + proc.stderr),
            "load_avg_end": load()[0]}


def _m0_seconds(log: str) -> float | None:
    for line in log.splitlines():
        if "built-in model done in" in line:
            return float(line.split("done in ")[1].split()[0])
    return None


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def markdown(results: list[dict]) -> str:
    iters = range(len(results[0]["rows"]))
    out = ["| seed | " + " | ".join(f"iter {i}" for i in iters) + " | run wall s | peak RSS MiB |",
           "|---|" + "---|" * (len(iters) + 2)]
    for res in results:
        accs = " | ".join(f"{r['test/accuracy']:.3f}" for r in res["rows"])
        out.append(f"| {res['seed']} | {accs} | {res['wall_s']:.0f} | {res['peak_rss_mib']:.0f} |")
    out += ["", "Mean ± std over seeds:", "",
            "| iteration | test acc (greedy) | maj@k | correct samples | train examples |",
            "|---|---|---|---|---|"]
    for i in iters:
        col = {k: [r["rows"][i][k] for r in results if k in r["rows"][i]]
               for k in ("test/accuracy", "test/maj_at_k", "frac_correct", "data_examples")}
        out.append(f"| {i} | " + " | ".join(_mean_std(v) for v in col.values()) + " |")
    out += ["", "Wall time per stage (s), mean over seeds:", "",
            "| iteration | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for i in iters:
        cells = []
        for s in STAGES:
            vals = [v for res in results if (v := res["rows"][i].get(f"{s}_s")) is not None]
            cells.append(f"{statistics.mean(vals):.1f}" if vals else "-")
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/default_run"))
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run at once (>1: accuracy only; wall times then share the CPUs)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    machine = {"python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "processor": platform.processor(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "jobs": args.jobs,
               "load_avg_start": load()[0]}
    # One output root per seed: each run directory is then the newest of its own root.
    roots = [Path(tempfile.mkdtemp(prefix=f"irpo-default-s{s}-")) for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda sr: run_seed(sr[0], sr[1], args.overrides),
                                zip(args.seeds, roots)))
    Path(args.out + ".json").write_text(json.dumps({"machine": machine, "runs": results}, indent=2))
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
