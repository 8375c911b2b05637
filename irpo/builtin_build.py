"""The reproducible build of the built-in model M0, and its record (checksum, accuracy).

irpo.builtin_model decides *whether* M0 must be built; this module builds it so that
the same config gives the same weights, bit for bit, on any x86-64 CPU with AVX2 (Intel
or AMD) and whatever the caller's thread count:

* The build runs in a child process (``python -m irpo.builtin_build SPEC``, started by
  irpo.builtin_model) whose environment (irpo.builtin_record.REPRODUCIBLE_ENV) pins the
  numeric code paths; the libraries read these switches only when they load, so the
  caller, which has imported torch already, cannot set them. The matrix products of the
  linear layers and of attention go through numpy's OpenBLAS with its kernels named, not
  detected (``OPENBLAS_CORETYPE=Haswell``: the same AVX2 code on Intel and AMD; why not
  torch's oneMKL: irpo.builtin_gemm). Anything left to oneMKL takes its
  conditional-numerical-reproducibility branch ``MKL_CBWR=COMPATIBLE``, which oneMKL
  documents as the same on Intel and Intel-compatible CPUs. ``ATEN_CPU_CAPABILITY=avx2``:
  PyTorch's own vectorised kernels take their AVX2 versions on AVX-512 machines too, so
  the width of their reductions does not depend on the CPU; ``ONEDNN_MAX_CPU_ISA=AVX2``
  for any oneDNN kernel. A fixed thread count (:data:`irpo.builtin_record.BUILD_THREADS`)
  for OpenBLAS, oneMKL and ATen, because each splits its work by the number of threads.
* Nothing else depends on the machine: one process, no data-loader workers, every
  random draw from generators seeded by ``model.pretrain_seed``.

Measured on this project's machine (tests/test_builtin_model.py): told another core
(``OPENBLAS_CORETYPE``) OpenBLAS gives other weights after 12 steps, and so does oneMKL
dispatched to other instruction sets (``MKL_ENABLE_INSTRUCTIONS``) with its default
kernels; with these switches both give the same weights. Not covered: a CPU without AVX2,
and another torch, numpy or oneMKL version, which may round differently; the checksum then
differs, and the run prints it.

The build writes ``irpo_builtin.json`` (irpo.builtin_record) beside the weights: the build key, the sha256
of the weight tensors (:func:`weights_checksum`) and M0's greedy accuracy on the first
``model.pretrain_eval_size`` test problems of the arithmetic task, measured as the run's
iteration-0 evaluation measures it (``sampler=hf``, batches of 64, greedy).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from irpo.builtin_record import BUILD_THREADS, RECORD, REPRODUCIBLE_ENV, describe, weights_checksum

EVAL_MAX_NEW_TOKENS = 96  # conf/dataset/arith.yaml's max_new_tokens
EVAL_BATCH_SIZE = 64  # conf/sampler/hf.yaml's batch_size: the same batches, the same greedy text

log = logging.getLogger(__name__)


def build_here(model_cfg: Any, data_cfg: Any, out: Path) -> dict[str, Any]:
    """Pre-train M0, save it to ``out``, measure it and write its record; returns the record."""
    import torch

    from irpo.builtin_gemm import blas_description, openblas_products
    from irpo.builtin_model import build_key, build_model, build_tokenizer, pretrain
    from irpo.tasks.arith import ArithTask

    torch.set_num_threads(BUILD_THREADS)  # OMP_NUM_THREADS says so too; this survives any caller
    start = time.perf_counter()
    log.info("building the built-in model in %s (%d threads; %s)", out, torch.get_num_threads(),
             ", ".join(f"{k}={os.environ.get(k)}" for k in REPRODUCIBLE_ENV))
    cpus = len(os.sched_getaffinity(0))
    if cpus < BUILD_THREADS:
        log.warning("this process may use %d CPU, but the build runs %d threads whatever the CPUs (so that "
                    "M0 is the same everywhere): expect it to take many times longer", cpus, BUILD_THREADS)
    examples = ArithTask(data_cfg).load_split("pretrain")
    texts = [e.prompt + (e.gold_cot or "") for e in examples]
    tokenizer = build_tokenizer(texts, model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer)
    log.info("pre-training %.2fM parameters for %d steps on %d examples",
             model.num_parameters() / 1e6, model_cfg.pretrain_steps, len(examples))
    with openblas_products(model, BUILD_THREADS):
        losses = pretrain(model, tokenizer, [(e.prompt, e.gold_cot or "") for e in examples], model_cfg)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    pretrain_s = time.perf_counter() - start
    accuracy = measure_accuracy(out, data_cfg, model_cfg.pretrain_eval_size)
    record = {
        "build_key": build_key(model_cfg, data_cfg),
        "sha256": weights_checksum(out),
        "test_accuracy": accuracy,
        "eval_size": model_cfg.pretrain_eval_size,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
        "pretrain_seconds": round(pretrain_s, 1),
        "threads": torch.get_num_threads(),
        "machine": {"cpu": _cpu_name(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "blas": blas_description(),
                    **{k: os.environ.get(k) for k in REPRODUCIBLE_ENV}},
    }
    (out / RECORD).write_text(json.dumps(record, indent=2))
    log.info("built-in model done in %.0f s (final loss %.3f): %s",
             record["seconds"], record["final_loss"] or 0, describe(record))
    return record


def measure_accuracy(model_dir: Path, data_cfg: Any, size: int) -> float | None:
    """Greedy accuracy on the first ``size`` test problems, as the run's iteration 0 measures it."""
    if size <= 0:
        return None
    import dataclasses

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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _exit_with_parent() -> None:
    """Stop when the process that started the build dies (its file lock is then gone,
    and the next run would build into the same place beside an orphan)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the built-in model (called by irpo.builtin_model).")
    parser.add_argument("spec", help='JSON: {"model": ModelConfig fields, "data": ArithConfig fields, "out": dir}')
    spec = json.loads(parser.parse_args(argv).spec)
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from irpo.config import ModelConfig
    from irpo.tasks.arith import ArithConfig

    build_here(ModelConfig(**spec["model"]), ArithConfig(**spec["data"]), Path(spec["out"]))


if __name__ == "__main__":
    main()
