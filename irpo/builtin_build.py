"""Building a built-in model from its config: pre-train, save, measure, record.

irpo.builtin_model calls :func:`build_here` on first use of a ``model.*`` config that is
not the shipped one. The same function made the shipped M0, with one command::

    python -m irpo.builtin_build --out irpo/assets/tiny            # the shipped M0's config
    python -m irpo.builtin_build model.pretrain_steps=400          # into the cache, as a run would

The options after ``--out`` are Hydra overrides of the run config (``model.*`` and, with
``dataset=arith``, the arithmetic task's fields); without ``--out`` the model goes where a
run with those overrides looks for it. The build uses torch's kernels at the process's
thread count, so its bits may differ between CPUs and thread counts: it records its own
sha256 and says so.

The record ``irpo_builtin.json`` (irpo.builtin_record) beside the weights holds the build
key, the sha256 of the weight tensors, M0's greedy accuracy on the first
``model.pretrain_eval_size`` test problems of the arithmetic task (measured as the run's
iteration-0 evaluation measures it: ``sampler=hf``, greedy), and the machine it was built on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from irpo.builtin_record import RECORD, describe, weights_checksum
from irpo.rundir import write_json_atomic

EVAL_MAX_NEW_TOKENS = 96  # conf/dataset/arith.yaml's max_new_tokens
EVAL_BATCH_SIZE = 64  # conf/sampler/hf.yaml's batch_size

log = logging.getLogger(__name__)


def build_here(model_cfg: Any, data_cfg: Any, out: Path, command: str | None = None) -> dict[str, Any]:
    """Pre-train M0, save it to ``out`` (which must not exist), measure it and write its
    record; returns the record."""
    import torch

    from irpo.builtin_model import build_key, build_model, build_tokenizer, pretrain
    from irpo.tasks.arith import ArithTask

    start = time.perf_counter()
    log.info("building the built-in model in %s (%d threads)", out, torch.get_num_threads())
    examples = ArithTask(data_cfg).load_split("pretrain")
    tokenizer = build_tokenizer([e.prompt + (e.gold_cot or "") for e in examples], model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer)
    log.info("pre-training %.2fM parameters for %d steps on %d examples",
             model.num_parameters() / 1e6, model_cfg.pretrain_steps, len(examples))
    losses = pretrain(model, tokenizer, [(e.prompt, e.gold_cot or "") for e in examples], model_cfg)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    pretrain_s = time.perf_counter() - start
    record = {
        "build_key": build_key(model_cfg, data_cfg),
        "sha256": weights_checksum(out),
        "test_accuracy": measure_accuracy(out, data_cfg, model_cfg.pretrain_eval_size),
        "eval_size": model_cfg.pretrain_eval_size,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
        "pretrain_seconds": round(pretrain_s, 1),
        "built": {"command": command or "irpo.builtin_model.ensure_builtin_model (first use)",
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                  "cpu": cpu_name(), "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "torch": torch.__version__, "python": platform.python_version()},
    }
    write_json_atomic(out / RECORD, record)
    log.info("built-in model done in %.0f s (final loss %.3f): %s; built with this machine's kernels, "
             "so its bits may differ from another machine's build of the same config",
             record["seconds"], record["final_loss"] or 0, describe(record))
    return record


def measure_accuracy(model_dir: Path, data_cfg: Any, size: int) -> float | None:
    """Greedy accuracy on the first ``size`` test problems, as the run's iteration 0 measures it."""
    if size <= 0:
        return None
    from irpo.evaluate import evaluate
    from irpo.sampling.hf import HFSampler, HFSamplerConfig
    from irpo.tasks.arith import ArithTask

    task = ArithTask(dataclasses.replace(data_cfg, test_size=size))
    sampler = HFSampler(str(model_dir), HFSamplerConfig(name="hf", batch_size=EVAL_BATCH_SIZE, device="cpu"))
    try:
        metrics = evaluate(task, sampler, task.load_split("test"), max_new_tokens=EVAL_MAX_NEW_TOKENS,
                           maj_k=0, maj_temperature=0.0, seed=0, prefix="M0 test")
    finally:
        sampler.close()
    return metrics["M0 test/accuracy"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m irpo.builtin_build",
        description="Build the built-in model of a run config (model=tiny, with overrides).")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the checkpoint (replaced if it exists); "
                             "default: the cache directory a run with these overrides uses")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.pretrain_steps=400")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from irpo.builtin_model import builtin_model_dir, check_architecture, pretrain_data_config
    from irpo.config import compose, to_config

    cfg = to_config(compose(["model=tiny", *args.overrides]))
    check_architecture(cfg.model)
    out = args.out or builtin_model_dir(cfg.model, cfg.dataset, cfg.cache_dir)
    tmp = out.parent / f"{out.name}.tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    command = " ".join(["python -m irpo.builtin_build", *(["--out", str(args.out)] if args.out else []),
                        *args.overrides])
    try:
        record = build_here(cfg.model, pretrain_data_config(cfg.dataset), tmp, command=command)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{out}: {describe(record)}", file=sys.stderr)


if __name__ == "__main__":
    main()
