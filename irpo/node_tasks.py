"""A stage's tasks on the nodes of a SLURM allocation: failures that say where, and shared paths.

:func:`run_tasks` runs a command built by irpo.launch (``srun ... --label``) and passes
its output through to the job's log, where each line carries its task number
(``1: ...``). When the command fails it raises :class:`NodeTaskFailed`, whose one-line
message names the failing node, the SLURM task and, for torchrun stages, the global
rank, and the log to read::

    sampling on 2 nodes (...) failed: task 1 on node vm-2: Exited with exit code 1;
    its output is in /shared/out/.../12_0_log.out, lines starting with "1: "

:func:`check_shared` proves, before the first stage, that folders the nodes hand files
through (``output_root``, ``cache_dir``, ``sampler.shard_dir``) are one folder on every
node: the driver writes a token into each, and every node's task must read it back.
A path that is local to the driver's node is the usual multi-node mistake, and
otherwise shows up only as a missing file after a stage has run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# srun's report of a failed task, e.g. "srun: error: vm-2: task 1: Exited with exit code 1"
_SRUN_ERROR = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<task>[\d,-]+): (?P<why>.+)")
# torchrun's "Root Cause" table (lines may carry srun's "k: " label)
_TORCHRUN_HOST = re.compile(r"^\s*(?:\d+:\s*)?host\s*:\s*(?P<host>\S+)")
_TORCHRUN_RANK = re.compile(r"^\s*(?:\d+:\s*)?rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local>\d+)\)")
_TOKEN = ".irpo-shared-check-"


class NodeTaskFailed(RuntimeError):
    """A task of a multi-node stage failed; the message names the node, task, rank and log."""

    def __init__(self, message: str, node: str | None = None, task: str | None = None,
                 rank: int | None = None):
        super().__init__(message)
        self.node, self.task, self.rank = node, task, rank


def job_log() -> str:
    """Where this SLURM job's output goes (scontrol's StdOut), or a description."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", job], check=False,
                                 capture_output=True,
                                 text=True, timeout=60).stdout
            found = re.search(r"\bStdOut=(\S+)", out)
            if found:
                return found.group(1).replace("%A", job).replace("%j", job)
        except (OSError, subprocess.SubprocessError):
            pass
    return "this job's output"


def _failure(what: str, lines: list[str], returncode: int) -> NodeTaskFailed:
    """The most specific account of a failure the output allows."""
    node = task = why = None
    rank = None
    for line in lines:
        if (m := _SRUN_ERROR.search(line)) and task is None:  # the first: the others are killed
            node, task, why = m["node"], m["task"], m["why"].strip()
        if m := _TORCHRUN_HOST.match(line):
            node = node or m["host"]
        if (m := _TORCHRUN_RANK.match(line)) and rank is None:
            rank = int(m["rank"])
    where = f"task {task} on node {node}" if task is not None else f"node {node}" if node else "a task"
    ranked = f" (rank {rank})" if rank is not None else ""
    label = f', lines starting with "{task.split(",")[0].split("-")[0]}: "' if task else ""
    message = (f"{what} failed: {where}{ranked}: {why or f'exit status {returncode}'}; "
               f"its output is in {job_log()}{label}")
    return NodeTaskFailed(message, node, task, rank)


def run_tasks(cmd: Sequence[str], what: str, env: Mapping[str, str] | None = None,
              poll: Callable[[], None] | None = None, every: float = 2.0) -> None:
    """Run ``cmd``, its output passed through to stderr; ``poll()`` every ``every`` seconds.

    Raises :class:`NodeTaskFailed` if it fails. An exception in the caller (a signal)
    terminates the command, which srun and torchrun pass on to every task.
    """
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = bytearray()

    def pump() -> None:  # raw chunks, so that progress bars (\r) still update as they come
        raw = getattr(sys.stderr, "buffer", None)
        while chunk := proc.stdout.read1(65536):
            if raw is not None:
                raw.write(chunk)
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-65536]  # the failure report is at the end

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            time.sleep(every if poll else 0.2)
            if poll:
                poll()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    reader.join(timeout=30)
    if poll:
        poll()
    if proc.returncode != 0:
        raise _failure(what, tail.decode(errors="replace").splitlines(), proc.returncode)


def check_shared(paths: Mapping[str, Path], nodes: int, alloc, run=subprocess.run) -> None:
    """Each of ``paths`` (config field -> folder) must be the same folder on the first
    ``nodes`` nodes of ``alloc``; else ValueError naming the field, the path and the node."""
    from irpo.launch import per_node_command

    token = uuid.uuid4().hex[:12]
    files = []
    try:
        for p in paths.values():
            Path(p).mkdir(parents=True, exist_ok=True)
            files.append(Path(p) / f"{_TOKEN}{token}")
            files[-1].write_text(token)
        args = [f"{field}={Path(p).resolve()}" for field, p in paths.items()]
        cmd = per_node_command(["-m", "irpo.node_tasks", token, *args], nodes=nodes, alloc=alloc)
        proc = run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    missing = re.findall(r"not shared: (\S+) (\S+)=(\S+)", proc.stdout + proc.stderr)
    if missing:
        node, field, _ = missing[0]
        raise ValueError(f"{field}={Path(paths[field]).resolve()} is not visible from node {node} (of "
                         f"{', '.join(alloc.nodes[:nodes])}): put it on a file system every "
                         f"node mounts at the same path")
    if proc.returncode != 0:
        raise ValueError(f"checking that {', '.join(paths)} are shared by the nodes failed: "
                         f"{(proc.stdout + proc.stderr).strip()[-2000:]}")


def check_shared_folders(cfg) -> None:
    """With stages on several nodes of this allocation (``sampler.nodes`` > 1, or
    ``trainer=deepspeed`` in a multi-node allocation), ``output_root``, ``cache_dir`` and
    ``sampler.shard_dir`` must be shared by those nodes (ValueError naming the field)."""
    from irpo.launch import Allocation

    alloc = Allocation.from_env()
    if alloc is None:
        return
    sampler_nodes = getattr(cfg.sampler, "nodes", 1)
    nodes = max(sampler_nodes, len(alloc.nodes) if cfg.trainer.name == "deepspeed" else 1)
    if nodes < 2:
        return
    folders = {"output_root": Path(cfg.output_root), "cache_dir": Path(cfg.cache_dir)}
    if sampler_nodes > 1 and cfg.sampler.shard_dir is not None:
        folders["sampler.shard_dir"] = Path(cfg.sampler.shard_dir)
    check_shared(folders, nodes, alloc)


def _check_token(token: str, fields: Sequence[str]) -> int:
    node = os.environ.get("SLURMD_NODENAME", os.uname().nodename)
    status = 0
    for arg in fields:
        field, _, path = arg.partition("=")
        f = Path(path) / f"{_TOKEN}{token}"
        try:
            seen = f.read_text()
        except OSError:
            seen = None
        if seen != token:
            print(f"not shared: {node} {field}={path}", flush=True)
            status = 1
    return status


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m irpo.node_tasks",
                                     description="one node's side of check_shared")
    parser.add_argument("token")
    parser.add_argument("paths", nargs="+", help="field=path")
    ns = parser.parse_args(args)
    sys.exit(_check_token(ns.token, ns.paths))


if __name__ == "__main__":
    main()
