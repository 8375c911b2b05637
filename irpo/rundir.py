"""Run directories and resumable stages.

A run directory is named by a hash of the resolved config (minus keys that do
not change results, such as tracking and output paths), so rerunning the same
command finds the same directory and a changed config gets its own.

Each stage writes its artifacts into ``<stage>.tmp/``, which is renamed to
``<stage>/`` when complete, and then a ``DONE`` marker holding the stage's
small JSON summary. A rerun skips every stage with a marker and redoes the
first one without (discarding any partial ``.tmp``), so a killed or pre-empted
run loses at most the stage it was in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Keys that do not change what a run computes: where it is logged or stored, and how
# often training saves step checkpoints (a rerun may change that and still resume).
NON_SEMANTIC_KEYS = ("hydra", "tracking", "output_root", "cache_dir", "run_name")
NON_SEMANTIC_FIELDS = (("trainer", "save_every_steps"), ("trainer", "save_every_min"),
                       ("sampler", "shard_dir"))
# Fields removed from the schemas that never changed what a run computes, hashed at the value
# every run had, so run directories made before their removal are found again (and resume).
RETIRED_FIELDS = {("eval", "batch_size"): 128}  # read by nothing (removed with issue 14)

# Debugging hooks used by the fault tests: kill this process with SIGKILL right
# after the named stage (for example "iter1/sample") is marked done, or right after
# the training step with this global number is recorded (irpo.driver; with
# trainer=deepspeed rank 0 does it, and "<step>:TERM" sends it SIGTERM instead).
KILL_AFTER_ENV = "IRPO_KILL_AFTER_STAGE"
KILL_AT_STEP_ENV = "IRPO_KILL_AT_TRAIN_STEP"


def config_hash(raw: DictConfig) -> str:
    # Resolved before the keys go: a kept value may interpolate one of them
    # (sampler.shard_dir: ${output_root}/vllm-shards).
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]),
                                      resolve=True)
    for key in NON_SEMANTIC_KEYS:
        resolved.pop(key, None)
    for group, key in NON_SEMANTIC_FIELDS:
        if isinstance(resolved.get(group), dict):
            resolved[group].pop(key, None)
    for (group, key), value in RETIRED_FIELDS.items():
        if isinstance(resolved.get(group), dict):
            resolved[group].setdefault(key, value)
    blob = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


class RunDir:
    """The on-disk state of one experiment (one sweep point)."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_config(cls, raw: DictConfig, output_root: str, name: str) -> RunDir:
        """The run directory of ``raw`` (not created: a run takes its lock first)."""
        return cls(Path(output_root).resolve() / "runs" / f"{name}-{config_hash(raw)}")

    def save_config(self, raw: DictConfig) -> None:
        """``config.yaml``, the resolved config, written by the first attempt only."""
        config_file = self.path / "config.yaml"
        if not config_file.exists():
            keep = [k for k in raw.keys() if k != "hydra"]
            tmp = config_file.with_name("config.yaml.tmp")
            OmegaConf.save(OmegaConf.masked_copy(raw, keep), tmp, resolve=True)
            os.replace(tmp, config_file)

    def stage_dir(self, iteration: int, stage: str) -> Path:
        return self.path / f"iter{iteration}" / stage

    def done_info(self, iteration: int, stage: str) -> dict | None:
        marker = self.stage_dir(iteration, stage) / "DONE"
        return json.loads(marker.read_text()) if marker.exists() else None

    def run_stage(
        self, iteration: int, stage: str, fn: Callable[[Path], dict], resumable: bool = False
    ) -> tuple[Path, dict]:
        """Run ``fn(tmp_dir) -> info`` unless the stage is already done.

        ``resumable``: a ``.tmp`` folder left by a killed attempt is kept, for ``fn`` to
        resume from (irpo.training.resume); otherwise it is discarded. Returns the stage's
        final directory and its info (with ``wall_s`` and ``skipped``).
        """
        final = self.stage_dir(iteration, stage)
        info = self.done_info(iteration, stage)
        if info is not None:
            log.info("iteration %d %s: done already, skipped", iteration, stage)
            return final, {**info, "skipped": True}
        tmp = final.with_name(final.name + ".tmp")
        if not (resumable and tmp.is_dir()):
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        log.info("iteration %d %s: starting", iteration, stage)
        t0 = time.perf_counter()
        info = dict(fn(tmp))
        info["wall_s"] = round(time.perf_counter() - t0, 3)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(final / "DONE", info)
        log.info("iteration %d %s: done in %.1f s", iteration, stage, info["wall_s"])
        if os.environ.get(KILL_AFTER_ENV) == f"iter{iteration}/{stage}":
            os.kill(os.getpid(), signal.SIGKILL)
        return final, {**info, "skipped": False}
