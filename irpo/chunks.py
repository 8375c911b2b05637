"""Sampling and evaluation in committed chunks, so a killed stage loses at most one chunk.

A stage that works through prompts (sample, eval) calls :func:`run_chunks`: prompts
``[k*C, (k+1)*C)`` form chunk k (C = ``sampler.chunk_size``), whose records are written
to ``<stage>.tmp/chunks/<k>.jsonl`` (a temporary file renamed into place) before chunk
k+1 starts. A rerun of the stage keeps its ``.tmp`` folder and reads the chunks that
are there instead of generating them again. Each prompt's randomness is fixed by its
global index (``first_index`` of the sampler call), so a resumed stage writes what an
uninterrupted one writes: exactly with ``sampler=vllm`` (one seed per prompt), and with
``sampler=hf`` for a given ``chunk_size`` and ``batch_size`` (one seed per batch).

SIGTERM / SIGUSR2 (SLURM's time-limit warning) / SIGINT let the chunk in flight finish
and be committed before the signal is handed on (irpo.training.resume.StopOnSignal).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from irpo.training.resume import StopOnSignal

log = logging.getLogger(__name__)

CHUNKS_DIR = "chunks"
# Fault tests: SIGKILL this process right after chunk k of the named stage is committed,
# e.g. IRPO_KILL_AFTER_CHUNK=iter1/sample:1.
KILL_AFTER_CHUNK_ENV = "IRPO_KILL_AFTER_CHUNK"


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of ``n`` items, ``size`` at a time (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"sampler.chunk_size={size} must be >= 1")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def run_chunks(stage_dir: Path, items: Sequence[Any], size: int,
               fn: Callable[[int, Sequence[Any]], list[dict]], label: str = "") -> list[dict]:
    """``fn(first_index, items[start:end])`` for each chunk not committed yet; all records, in order.

    ``label`` (``iter1/sample``) names the stage in logs and in the fault-test hook.
    """
    folder = Path(stage_dir) / CHUNKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    bounds = chunk_bounds(len(items), size)
    records: list[dict] = []
    reused = 0
    with StopOnSignal() as stop:
        for k, (start, end) in enumerate(bounds):
            path = folder / f"{k}.jsonl"
            if path.exists():
                part = _read(path)
                reused += 1
            else:
                try:
                    part = fn(start, items[start:end])
                except Exception:
                    # A signal that also reached the chunk's workers (srun passes SLURM's
                    # warning to every step) makes them stop, and fn fail: the signal wins,
                    # so that the job is re-queued rather than failed.
                    if stop.received:
                        log.warning("%s: chunk %d failed after %s; acting on the signal", label, k,
                                    signal.Signals(stop.received).name)
                        stop.act()
                    raise
                if len(part) != end - start:
                    raise RuntimeError(f"{label} chunk {k}: {len(part)} records for {end - start} prompts")
                _write(path, part)
                if os.environ.get(KILL_AFTER_CHUNK_ENV) == f"{label}:{k}":
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop.received:  # also after the last one: the signal must not be lost
                    log.warning("%s: stopping after chunk %d of %d (committed)", label, k + 1, len(bounds))
                    stop.act()
            records += part
    if reused:
        log.info("%s: %d of %d chunks were committed by an earlier attempt, reused",
                 label, reused, len(bounds))
    return records


def stage_chunk_size(sampler_cfg: Any, num_items: int) -> int:
    """Prompts per chunk of a stage. With ``sampler.nodes`` > 1 the stage is one call: each
    node's engine commits chunks of its own shard (irpo.sampling.shards), so engines are
    not started anew for every chunk."""
    if getattr(sampler_cfg, "nodes", 1) > 1:
        return max(num_items, 1)
    return sampler_cfg.chunk_size


def discard_chunks(stage_dir: Path) -> None:
    """The stage's own output is written: its chunks go (the stage folder keeps its layout)."""
    folder = Path(stage_dir) / CHUNKS_DIR
    for path in folder.glob("*"):
        path.unlink()
    if folder.exists():
        folder.rmdir()
