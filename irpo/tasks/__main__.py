"""Inspect a task: split sizes, one rendered prompt, and how often the gold passes its own checker.

    python -m irpo.tasks gsm8k [--data-dir DIR] [--n N] [--split test]

The dataset settings are ``dataset=<name>`` composed by Hydra (``math500`` is ``dataset=math`` with
``dataset.name=math500``), so what is shown is what a run with ``dataset=<name>`` sees. The self-check feeds each record's gold
CoT (or, for ARC, "Final answer: (X)") to ``is_correct`` against its own gold answer; anything
below 100% is a checker or data problem worth reading, and the failures are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from irpo.config import DatasetConfig, compose, to_config
from irpo.tasks import build_task

# Task names served by another option's file: name -> option.
ALIASES = {"math500": "math"}


def dataset_config(name: str, data_dir: str | None = None) -> DatasetConfig:
    """``dataset=<name>`` as Hydra composes it for a run; ``data_dir`` replaces the option's.
    (Set after composing, not as an override: a path needs no quoting then.)"""
    cfg = to_config(compose([f"dataset={ALIASES.get(name, name)}", f"dataset.name={name}"])).dataset
    return dataclasses.replace(cfg, data_dir=data_dir) if data_dir else cfg


def gold_response(ex) -> str:
    return ex.gold_cot if ex.gold_cot is not None else f"Final answer: ({ex.gold_answer})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irpo.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="task name, e.g. gsm8k, math, math500, arc_challenge")
    parser.add_argument("--data-dir", help="data root or task folder (default: config, then $IRPO_DATA_DIR, then hub)")
    parser.add_argument("--n", type=int, default=None, help="records per split to self-check (default: all)")
    parser.add_argument("--split", default="test", help="split whose first prompt is shown")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    task = build_task(dataset_config(args.name, args.data_dir))
    splits = {}
    for split in ("train", "valid", "test"):
        splits[split] = task.load_split(split)
    print(f"task {args.name}: " + ", ".join(f"{s}={len(v)}" for s, v in splits.items())
          + f"  (loaded in {time.perf_counter() - start:.2f}s)")
    if getattr(task, "dropped", None):
        print(f"left out (no usable gold answer): {', '.join(task.dropped)}")
    shown = splits[args.split][0] if splits[args.split] else None
    if shown is not None:
        print(f"\n--- prompt of {shown.id} ---\n{shown.prompt}\n--- gold: {shown.gold_answer!r}")
    worst = 1.0
    for split, examples in splits.items():
        examples = examples[: args.n] if args.n is not None else examples
        if not examples:
            continue
        start = time.perf_counter()
        failures = [ex for ex in examples if not task.is_correct(gold_response(ex), ex.gold_answer)]
        took = time.perf_counter() - start
        rate = 1 - len(failures) / len(examples)
        worst = min(worst, rate)
        print(f"self-check {split}: {len(examples) - len(failures)}/{len(examples)} = {rate:.2%} "
              f"in {took:.2f}s ({len(examples) / max(took, 1e-9):.0f} checks/s)")
        for ex in failures[:10]:
            print(f"  FAIL {ex.id}: gold {ex.gold_answer!r}, extracted "
                  f"{task.extract_answer(gold_response(ex))!r}")
    return 0 if worst == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
