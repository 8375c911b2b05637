"""Command lines for multi-process stages: srun + torchrun in a SLURM allocation, torchrun locally.

The driver runs once per experiment (one submitit task per SLURM job, see
conf/launcher/slurm.yaml). A stage that needs several processes -- DeepSpeed
training over every GPU of every node, one sampling engine per node -- runs as
a child command built here, so the same driver code works on a laptop and in
an 8-node allocation:

    cmd = stage_command(["-m", "irpo.some_stage", str(stage_dir)], procs_per_node=8)
    subprocess.run(cmd, check=True)

Inside an allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST set) that is

    srun --overlap --nodes=N --ntasks=N --ntasks-per-node=1 --nodelist=<nodes>
         --kill-on-bad-exit=1 --label python -m torch.distributed.run --nnodes=N
         --nproc-per-node=P --rdzv-backend=c10d --rdzv-endpoint=<first node>:<port>
         --rdzv-id=<job id> -m irpo.some_stage ...

(``--overlap`` because the driver's own step already holds the first node's
CPUs, memory and GPUs); outside, ``python -m torch.distributed.run --standalone
--nproc-per-node=P ...``. :func:`per_node_command` starts one plain process
per node (each reads SLURM_NODEID / SLURM_NNODES to pick its shard).

Check an allocation by hand (inside ``salloc -N2`` or an sbatch script):

    python -m irpo.launch check --procs-per-node 2 --out /shared/tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 29500


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


@dataclass(frozen=True)
class Allocation:
    """The SLURM job this process runs in: its id, node names and the first node's address."""

    job_id: str
    nodes: tuple[str, ...]
    head_addr: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Allocation | None:
        """The current allocation, or None outside SLURM (asks scontrol for names and address)."""
        env = os.environ if env is None else env
        job, nodelist = env.get("SLURM_JOB_ID"), env.get("SLURM_JOB_NODELIST")
        if not job or not nodelist:
            return None
        nodes = tuple(_scontrol("show", "hostnames", nodelist).split())
        # Node names need not resolve (NodeAddr may differ); the rendezvous needs an address.
        found = re.search(r"\bNodeAddr=(\S+)", _scontrol("-o", "show", "node", nodes[0]))
        return cls(job, nodes, found.group(1) if found else nodes[0])

    def port(self) -> int:
        """A rendezvous port that differs between jobs sharing a node."""
        return DEFAULT_PORT + int(re.sub(r"\D", "", self.job_id) or 0) % 1000


_FROM_ENV = object()


def _srun(alloc: Allocation, nodes: int | None) -> tuple[list[str], int]:
    n = len(alloc.nodes) if nodes is None else nodes
    if not 1 <= n <= len(alloc.nodes):
        raise ValueError(f"nodes={n}: the allocation has {len(alloc.nodes)} node(s)")
    cmd = ["srun", "--overlap", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
           f"--nodelist={','.join(alloc.nodes[:n])}", "--kill-on-bad-exit=1",
           "--label"]  # each output line starts with its task number (irpo.node_tasks)
    return cmd, n


def stage_command(argv: Sequence[str], procs_per_node: int = 1, *, nodes: int | None = None,
                  port: int | None = None, alloc=_FROM_ENV,
                  python: str = sys.executable) -> list[str]:
    """torchrun ``argv`` with ``procs_per_node`` processes on each of ``nodes`` nodes.

    ``argv`` is what follows ``torchrun`` (a script path or ``-m module``, then
    its arguments). ``nodes`` defaults to the whole allocation (1 outside SLURM).
    """
    if procs_per_node < 1:
        raise ValueError(f"procs_per_node={procs_per_node} must be >= 1")
    alloc = Allocation.from_env() if alloc is _FROM_ENV else alloc
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc-per-node={procs_per_node}"]
    if alloc is None:
        if nodes not in (None, 1):
            raise ValueError(f"nodes={nodes}: outside a SLURM allocation there is one node")
        return [*torchrun, "--standalone", *argv]
    srun, n = _srun(alloc, nodes)
    port = alloc.port() if port is None else port
    return [*srun, *torchrun, f"--nnodes={n}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={alloc.head_addr}:{port}", f"--rdzv-id={alloc.job_id}", *argv]


def per_node_command(argv: Sequence[str], *, nodes: int | None = None, alloc=_FROM_ENV,
                     python: str = sys.executable) -> list[str]:
    """``python argv`` once per node (SLURM_NODEID tells each its shard); once, locally."""
    alloc = Allocation.from_env() if alloc is _FROM_ENV else alloc
    if alloc is None:
        return [python, *argv]
    srun, _ = _srun(alloc, nodes)
    return [*srun, python, *argv]


# ------------------------------------------------------------------ self-check


def _worker(out: Path) -> None:
    """One torchrun worker: an all-reduce over gloo, then its view of the world as JSON."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    node = os.environ.get("SLURMD_NODENAME", "local")
    record = {"rank": rank, "world_size": world, "node": node, "rank_sum": total.item(),
              "local_rank": int(os.environ["LOCAL_RANK"])}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def check(out: str, procs_per_node: int = 2, stages: int = 2) -> dict:
    """Run ``stages`` all-reduce stages over the allocation (or locally); return what they saw.

    Used by tests/test_slurm.py (submitted as the one task of a job) and by hand.
    """
    results = []
    for i in range(stages):  # twice by default: consecutive stages reuse the rendezvous port
        stage_dir = Path(out) / f"stage{i}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        cmd = stage_command(["-m", "irpo.launch", "worker", str(stage_dir)], procs_per_node)
        subprocess.run(cmd, check=True, timeout=600)
        results.append([json.loads(p.read_text()) for p in sorted(stage_dir.glob("rank*.json"))])
    alloc = Allocation.from_env()
    return {"command": cmd, "stages": results, "driver_pid": os.getpid(),
            "driver_ntasks": os.environ.get("SLURM_NTASKS"),
            "allocation_nodes": list(alloc.nodes) if alloc else []}


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m irpo.launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="all-reduce across the allocation, as a training stage would")
    c.add_argument("--out", required=True, help="a directory every node can write")
    c.add_argument("--procs-per-node", type=int, default=2)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("out", type=Path)
    ns = parser.parse_args(args)
    if ns.cmd == "worker":
        _worker(ns.out)
    else:
        print(json.dumps(check(ns.out, ns.procs_per_node), indent=1))


if __name__ == "__main__":
    main()
