"""Time a pre-training step of M0's build with each matrix-product path, side by side.

The build (irpo/builtin_build.py) must give the same bits on Intel and AMD. It sends its
products through OpenBLAS with named kernels (irpo/builtin_gemm.py); before, they went
through oneMKL's portable COMPATIBLE branch. This runs the build's real pre-training (the
default config, its own batches) for a few steps in a child process per path, in the
build's environment (irpo.builtin_record.REPRODUCIBLE_ENV), alternating the paths over
rounds so that a change of load hits both, and records the median seconds per step and
the loss at the last step (the paths round differently, so it agrees to about 1e-6):

* ``openblas``: the build today;
* ``mkl-compatible``: oneMKL's COMPATIBLE branch, the build before;
* ``mkl-avx2``: oneMKL's AVX2 branch (Intel-only; oneMKL ignores it on AMD), for scale.

    python benchmarks/m0_build_step.py      # -> benchmarks/results/m0_build_step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import cpu_name, load, versions  # benchmarks/ is on the path now

PATHS = {"openblas": {}, "mkl-compatible": {}, "mkl-avx2": {"MKL_CBWR": "AVX2,STRICT"}}
RESULTS = Path(__file__).parent / "results"


def child(path: str, steps: int, warmup: int) -> dict:
    """Pre-train the default M0 for warmup + steps steps; time the last ``steps``."""
    import contextlib
    import dataclasses
    import time

    import torch

    from irpo.builtin_gemm import openblas_products
    from irpo.builtin_model import build_model, build_tokenizer, pretrain, pretrain_data_config
    from irpo.builtin_record import BUILD_THREADS
    from irpo.config import compose, to_config
    from irpo.tasks.arith import ArithTask

    torch.set_num_threads(BUILD_THREADS)
    cfg = to_config(compose(["model=tiny"])).model
    examples = ArithTask(pretrain_data_config(None)).load_split("pretrain")
    tokenizer = build_tokenizer([e.prompt + (e.gold_cot or "") for e in examples], cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    pairs = [(e.prompt, e.gold_cot or "") for e in examples]
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    # The real schedule's batches and learning rates; only the first steps are run.
    cfg = dataclasses.replace(cfg, pretrain_steps=warmup + steps)
    paths = openblas_products(model, BUILD_THREADS) if path == "openblas" else contextlib.nullcontext()
    with paths:
        losses = pretrain(model, tokenizer, pairs, cfg, progress=False)
    stamps.append(time.perf_counter())
    per_step = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return {"median_s": round(statistics.median(per_step), 3), "loss": losses[-1]}


def run_all(steps: int, warmup: int, rounds: int) -> dict:
    from irpo.builtin_record import REPRODUCIBLE_ENV

    out = {"cpu": cpu_name(), **versions("torch", "numpy"), "load_before": load(), "steps": steps,
           "warmup": warmup, "rounds": rounds, "env": REPRODUCIBLE_ENV, "results": []}
    for r in range(rounds):
        for path, env in PATHS.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--child", path, "--steps", str(steps), "--warmup", str(warmup)],
                env={**os.environ, **REPRODUCIBLE_ENV, **env}, capture_output=True, text=True, check=True)
            out["results"].append({"round": r, "path": path, **json.loads(proc.stdout.splitlines()[-1])})
    out["load_after"] = load()
    return out


def to_markdown(data: dict) -> str:
    by_path = {p: [r for r in data["results"] if r["path"] == p] for p in PATHS}
    base = statistics.median(r["median_s"] for r in by_path["mkl-compatible"])
    lines = [f"CPU: {data['cpu']}; torch {data['torch']}, numpy {data['numpy']}; load "
             f"{data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after; {data['steps']} steps "
             f"after {data['warmup']} warm-up, {data['rounds']} rounds alternating the paths; 2 threads.", "",
             "| path | s/step (per round) | median | vs mkl-compatible | loss at the last step |",
             "|---|---|---|---|---|"]
    for path, rows in by_path.items():
        med = statistics.median(r["median_s"] for r in rows)
        lines.append(f"| {path} | {', '.join(str(r['median_s']) for r in rows)} | {med} | "
                     f"{base / med:.2f}x faster | {rows[0]['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup)))
        return
    data = run_all(args.steps, args.warmup, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "m0_build_step.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "m0_build_step.md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
