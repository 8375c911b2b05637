"""Iteration cost: wall time per stage of one default iteration, growth with prompts x samples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/iteration_cost.py [--repeats 2] [--scales 2]
        [--budget-min M] [--out benchmarks/results/iteration_cost] [extra Hydra overrides]

Runs ``python -m irpo.main iterations=1 tracking=none`` in a subprocess (via
benchmarks/default_run.py's ``run_seed``, as a user would) at these configurations:

* ``1x``: the defaults, whatever conf/ says at run time (read from
  ``python -m irpo.main --cfg job --resolve``, never hard-coded here);
* ``<k>x_prompts``: ``dataset.train_size`` times k (same samples per prompt);
* ``<k>x_samples``: ``samples_per_prompt`` times k (same prompts; ``pairs_per_prompt``
  stays at its default, so the pairs grow only through prompts that gain both a
  correct and a wrong sample).

Repeats are interleaved (1x, 2x_prompts, 2x_samples, 1x, ...) so that load from
other jobs on a shared machine falls on every configuration alike. Every run has
its own output root (no run resumes another) and the default seed, so repeats do
identical work and differ only in timing. The scaling runs pass ``eval.maj_k=0``
(evaluation does not depend on the training prompts); the first ``1x`` run is the
unmodified default (maj@k evaluation included) and gives the default per-stage
table; its sample/label/data/train times also count towards the ``1x`` medians.

Per configuration: the median wall time per stage (from each stage's DONE marker),
the tokens sampled and pairs built, the ratio of each to ``1x``, and the cost per
unit of work (sampling per token, training per pair), whose ratio to ``1x`` is 1.0
when the stage scales linearly. The built-in M0 must already be cached (under
``$IRPO_CACHE_DIR``, default outputs/test-cache): building it would dominate the
timings, so the script refuses unless ``--allow-m0-build``. Writes ``<out>.json``
(every run) and ``<out>.md`` (the tables, with the machine and its load average).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from default_run import run_seed  # the same subprocess runner and DONE reader)
from measure import gpu_name, load
from measure import machine as machine_facts

BASE = "1x"
STAGES = ("sample", "label", "data", "train", "eval")
COMMON = ["iterations=1", "tracking=none"]


def compose_defaults(extra: list[str]) -> dict:
    """The resolved config the runs will use, as ``python -m irpo.main --cfg job`` prints it."""
    cmd = [sys.executable, "-m", "irpo.main", "--cfg", "job", "--resolve", *COMMON, *extra]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return yaml.safe_load(proc.stdout)


def scale_configs(cfg: dict, scales: list[int]) -> dict[str, dict]:
    """Configuration name -> {prompts, samples_per_prompt, overrides} at each scale factor."""
    prompts, n = int(cfg["dataset"]["train_size"]), int(cfg["samples_per_prompt"])
    out = {BASE: {"prompts": prompts, "samples_per_prompt": n, "overrides": []}}
    for k in scales:
        if k < 2:
            raise SystemExit(f"--scales {k}: scale factors are integers >= 2 (1x always runs)")
        out[f"{k}x_prompts"] = {"prompts": k * prompts, "samples_per_prompt": n,
                                "overrides": [f"dataset.train_size={k * prompts}"]}
        out[f"{k}x_samples"] = {"prompts": prompts, "samples_per_prompt": k * n,
                                "overrides": [f"samples_per_prompt={k * n}"]}
    return out


def merge_overrides(extra: list[str], scaled: list[str]) -> list[str]:
    """The user's overrides with the scaled keys replaced (``extra`` set the 1x values)."""
    keys = {o.split("=", 1)[0] for o in scaled}
    return [o for o in extra if o.split("=", 1)[0].lstrip("+~") not in keys] + scaled


def schedule(names: list[str], repeats: int) -> list[dict]:
    """Interleaved runs; the first run of 1x keeps the default evaluation (maj@k)."""
    plan = []
    for rep in range(repeats):
        for name in names:
            default_eval = rep == 0 and name == BASE
            plan.append({"config": name, "repeat": rep, "default_eval": default_eval,
                         "overrides": [*COMMON, f"run_name=itercost-{name}-r{rep}",
                                       *([] if default_eval else ["eval.maj_k=0"])]})
    return plan


def m0_dir(cfg: dict) -> Path | None:
    """Where the runs will look for the built-in M0 (None for a model given by path)."""
    from omegaconf import OmegaConf

    from irpo.builtin_model import builtin_model_dir

    if cfg["model"].get("builtin") is None:
        return None
    return builtin_model_dir(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["dataset"]),
                             cfg["cache_dir"])


def run_one(item: dict, conf: dict, extra: list[str], seed: int, work: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"{item['config']}-r{item['repeat']}-", dir=work))
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = load()[0]
    res = run_seed(seed, root, [*item["overrides"], *merge_overrides(extra, conf["overrides"])])
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(root, ignore_errors=True)
    res["cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    res["load_avg_start"] = load0
    return {**{k: item[k] for k in ("config", "repeat", "default_eval")}, **res}


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _affine(base: dict, row: dict, time_key: str, work_key: str, unit: float) -> dict | None:
    """time = fixed + marginal * work through the 1x point and this one (None: work too similar).

    A fixed part near 0 s means the stage is linear in its work; ``marginal`` is per
    1/unit of the work (µs per token for unit=1e6, ms per pair for unit=1e3).
    """
    t0, t1, w0, w1 = base[time_key], row[time_key], base[work_key], row[work_key]
    if None in (t0, t1, w0, w1) or w1 < 1.2 * w0:
        return None
    marginal = (t1 - t0) / (w1 - w0)
    return {"fixed_s": t0 - marginal * w0, "marginal": marginal * unit}


def summarize(runs: list[dict], configs: dict[str, dict]) -> dict:
    """Median per stage and work per configuration, its ratio to 1x, and cost per unit of work.

    ``runs`` are run_seed results with config/repeat/default_eval added; row 0 is
    iteration 0 (evaluation of M0 only), row 1 the measured iteration.
    """
    table = {}
    for name, conf in configs.items():
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        it1 = [r["rows"][1] for r in mine]
        greedy = [r for r in mine if not r["default_eval"]]
        row = {"prompts": conf["prompts"], "samples_per_prompt": conf["samples_per_prompt"],
               "samples": conf["prompts"] * conf["samples_per_prompt"], "runs": len(mine),
               "tokens": _median([r.get("tokens_sampled") for r in it1]),
               "pairs": _median([r.get("data_examples") for r in it1]),
               "wall_s": _median([r["wall_s"] for r in greedy] or [r["wall_s"] for r in mine]),
               "cpu_s": _median([r["cpu_s"] for r in greedy] or [r["cpu_s"] for r in mine])}
        for s in STAGES[:-1]:
            row[f"{s}_s"] = _median([r.get(f"{s}_s") for r in it1])
        row["eval_s"] = _median([r["rows"][1].get("eval_s") for r in greedy])
        row["us_per_token"] = _ratio(row["sample_s"], row["tokens"] and row["tokens"] / 1e6)
        row["ms_per_pair"] = _ratio(row["train_s"], row["pairs"] and row["pairs"] / 1e3)
        table[name] = row
    base = table[BASE]
    for row in table.values():
        row["ratio"] = {k: _ratio(row[k], base[k]) for k in (
            "samples", "tokens", "pairs", "sample_s", "label_s", "data_s", "train_s", "eval_s",
            "wall_s", "cpu_s", "us_per_token", "ms_per_pair")}
        row["affine"] = {"sample_per_token": _affine(base, row, "sample_s", "tokens", 1e6),
                         "train_per_pair": _affine(base, row, "train_s", "pairs", 1e3)}
    default = next((r for r in runs if r["default_eval"]), None)
    return {"configs": table, "default_run": default and {
        "iter0_eval_s": default["rows"][0].get("eval_s"),
        **{f"{s}_s": default["rows"][1].get(f"{s}_s") for s in STAGES},
        "wall_s": default["wall_s"], "cpu_s": default["cpu_s"],
        "stages_s": sum(default["rows"][1].get(f"{s}_s", 0) for s in STAGES)
        + default["rows"][0].get("eval_s", 0), "peak_rss_mib": default["peak_rss_mib"]}}


def machine(cfg: dict) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    return machine_facts(omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                         torch_threads=torch.get_num_threads(), cuda=gpu_name(), load_avg_start=load(),
                         git_commit=commit, started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _loads(vals) -> str:
    return "/".join(f"{x:.2f}" for x in vals)


def markdown(result: dict) -> str:
    m, d, s = result["machine"], result["defaults"], result["summary"]
    gpu = f", GPU {m['cuda']}" if m["cuda"] else ""
    machine_line = (
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"OMP_NUM_THREADS={m['omp_num_threads']} (torch threads {m['torch_threads']}), "
        f"torch {m['torch']}{gpu}, python {m['python']}; commit {m['git_commit']}, started "
        f"{m['started_utc']} UTC. Load average (1/5/15 min) at start "
        f"{_loads(m['load_avg_start'])}, at end {_loads(m['load_avg_end'])}.")
    defaults_line = (
        f"Defaults: train_size={d['train_size']} prompts, "
        f"samples_per_prompt={d['samples_per_prompt']}, pairs_per_prompt={d['pairs_per_prompt']}, "
        f"add_gold_to_winners={d['add_gold_to_winners']}, trainer.lr={d['lr']}, "
        f"test_size={d['test_size']}, maj_k={d['maj_k']}; "
        f"{result['repeats']} interleaved repeats per configuration.")
    out = [machine_line, "", defaults_line, ""]
    peak = max((max(r["load_avg_start"], r["load_avg_end"]) for r in result["runs"]), default=0)
    if peak > m["usable_cpus"]:
        out += [(f"The machine was shared: the 1-minute load average reached {peak:.1f} on "
                f"{m['usable_cpus']} CPUs during these runs, so wall times carry that noise "
                "(compare the repeats in the last table; CPU s is this run's process only)."),
                ""]
    if s["default_run"]:
        r = s["default_run"]
        keys = ("iter0_eval_s", "sample_s", "label_s", "data_s", "train_s", "eval_s", "stages_s",
                "wall_s", "cpu_s")
        out += ["One default iteration (`iterations=1`, default evaluation with maj@k), wall s:", "",
                _header(["eval M0 (iter 0)", "sample", "label", "data", "train", "eval (iter 1)",
                         "all stages", "process wall", "CPU s", "peak RSS MiB"]),
                "| " + " | ".join(_f(r[k], ".2f" if k in ("label_s", "data_s") else ".1f")
                                  for k in keys) + f" | {r['peak_rss_mib']:.0f} |", ""]
    out += ["Median per configuration (iteration 1; eval greedy only, `eval.maj_k=0`), wall s:", "",
            _header(["config", "prompts", "samples/prompt", "tokens sampled", "pairs", *STAGES,
                     "process wall", "CPU s", "µs/token (sample)", "ms/pair (train)"])]
    for name, r in s["configs"].items():
        cells = [name, str(r["prompts"]), str(r["samples_per_prompt"]), _f(r["tokens"], ".0f"),
                 _f(r["pairs"], ".0f")]
        cells += [_f(r[f"{k}_s"], ".2f" if k in ("label", "data") else ".1f")
                  for k in (*STAGES, "wall", "cpu")]
        cells += [_f(r["us_per_token"]), _f(r["ms_per_pair"])]
        out.append("| " + " | ".join(cells) + " |")
    ratio_keys = ("samples", "tokens", "sample_s", "us_per_token", "pairs", "train_s",
                  "ms_per_pair", "label_s", "wall_s", "cpu_s")
    out += ["", "Ratio to 1x (a per-token or per-pair cost ratio of 1.00 = linear in the work):", "",
            _header(["config", "samples", "tokens", "sample s", "sample s per token", "pairs",
                     "train s", "train s per pair", "label s", "process wall", "CPU s"])]
    for name, r in s["configs"].items():
        out.append(f"| {name} | " + " | ".join(_f(r["ratio"][k], ".2f") for k in ratio_keys) + " |")
    out += ["", ("Fixed + marginal cost through the 1x point and each scaled one "
            "(time = fixed + marginal x work; a small fixed part = linear):"), "",
            _header(["config", "sample: fixed s", "sample: µs per extra token",
                     "train: fixed s", "train: ms per extra pair"])]
    for name, r in s["configs"].items():
        if name == BASE:
            continue
        cells = []
        for key in ("sample_per_token", "train_per_pair"):
            fit = r["affine"][key] or {}
            cells += [_f(fit.get("fixed_s")), _f(fit.get("marginal"))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Every run, in the order run (the load average is the machine's 1-minute one):", "",
            _header(["config", "repeat", "load start/end", "process wall s", "CPU s", "sample s",
                     "train s", "eval s (iter 0/1)", "test acc"])]
    for r in result["runs"]:
        it0, it1 = r["rows"][0], r["rows"][1]
        out.append(f"| {r['config']}{' (maj@k eval)' if r['default_eval'] else ''} | "
                   f"{r['repeat']} | {r['load_avg_start']:.1f}/{r['load_avg_end']:.1f} | "
                   f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | {_f(it1.get('sample_s'))} | "
                   f"{_f(it1.get('train_s'))} | {_f(it0.get('eval_s'))}/{_f(it1.get('eval_s'))} | "
                   f"{_f(it1.get('test/accuracy'), '.3f')} |")
    return "\n".join(out) + "\n"


def _header(cols: list[str]) -> str:
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scales", type=int, nargs="+", default=[2], help="scale factors besides 1x")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/iteration_cost"))
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start another repeat only if it should finish within this many minutes")
    ap.add_argument("--allow-m0-build", action="store_true",
                    help="let the first run pre-train M0 when it is not cached")
    ap.add_argument("--from-json", metavar="JSON",
                    help="only re-render <out>.md from the runs in this JSON (no new runs)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["summary"] = summarize(result["runs"], result["configs"])
        Path(args.out + ".md").write_text(markdown(result))
        print(markdown(result))
        return
    os.environ.setdefault("IRPO_CACHE_DIR", str(REPO / "outputs" / "test-cache"))
    cfg = compose_defaults(args.overrides)
    m0 = m0_dir(cfg)
    if m0 is not None and not (m0 / "config.json").exists() and not args.allow_m0_build:
        raise SystemExit(f"M0 is not cached at {m0} (cache_dir={cfg['cache_dir']}): building it "
                         "would be timed with the first run; build it first or pass "
                         "--allow-m0-build")
    configs = scale_configs(cfg, args.scales)
    defaults = {"train_size": cfg["dataset"]["train_size"],
                "samples_per_prompt": cfg["samples_per_prompt"],
                "pairs_per_prompt": cfg["pairs_per_prompt"], "lr": cfg["trainer"]["lr"],
                "add_gold_to_winners": cfg["dataset"]["add_gold_to_winners"],
                "test_size": cfg["dataset"]["test_size"], "maj_k": cfg["eval"]["maj_k"],
                "seed": cfg["seed"], "m0": str(m0)}
    result = {"machine": machine(cfg), "defaults": defaults, "repeats": args.repeats,
              "overrides": args.overrides, "configs": configs, "runs": []}
    work, t0 = Path(tempfile.mkdtemp(prefix="irpo-itercost-")), time.perf_counter()
    for i, item in enumerate(schedule(list(configs), args.repeats)):
        done = item["repeat"]  # repeats finished so far, when this item starts a new one
        elapsed = time.perf_counter() - t0
        if args.budget_min and done and item["config"] == BASE \
                and elapsed / done * (done + 1) > 60 * args.budget_min:
            print(f"stopping after {done} repeats: another would pass --budget-min "
                  f"{args.budget_min} ({elapsed / 60:.1f} min so far)", flush=True)
            result["repeats"] = done
            break
        print(f"[{i + 1}] {item['config']} repeat {item['repeat']} "
              f"(load {load()[0]:.2f})", flush=True)
        r = run_one(item, configs[item["config"]], args.overrides, cfg["seed"], work)
        result["runs"].append(r)
        print(f"    wall {r['wall_s']:.0f} s, stages " + ", ".join(
            f"{s} {r['rows'][1].get(f'{s}_s', 0):.1f}" for s in STAGES), flush=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=2))  # partial results survive
    shutil.rmtree(work, ignore_errors=True)
    if any(r["m0_build_s"] for r in result["runs"]):
        print("note: a run built M0; its wall time includes the build", flush=True)
    result["machine"]["load_avg_end"] = load()
    result["summary"] = summarize(result["runs"], configs)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
