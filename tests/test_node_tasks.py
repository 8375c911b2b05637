"""irpo.node_tasks without a cluster: a failed task named from srun's and torchrun's own
reports, the output passed through, and the shared-folder check's verdicts.

The real thing (srun across two nodes, a killed engine, a folder one node cannot see)
is tests/test_two_nodes.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from irpo.launch import Allocation
from irpo.node_tasks import NodeTaskFailed, check_shared, run_tasks

ALLOC = Allocation("77", ("gpu001", "gpu002"), "10.0.0.1")


def script(text: str) -> list[str]:
    return [sys.executable, "-c", text]


def test_srun_report_names_the_task_node_and_log(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cmd = script("import sys; print('0: working'); "
                 "print('srun: error: gpu002: task 1: Killed', file=sys.stderr); "
                 "print('srun: error: gpu001: task 0: Terminated', file=sys.stderr); sys.exit(137)")
    with pytest.raises(NodeTaskFailed) as err:
        run_tasks(cmd, "sampling on 2 nodes")
    assert str(err.value) == ("sampling on 2 nodes failed: task 1 on node gpu002: Killed; its output "
                              "is in this job's output, lines starting with \"1: \"")
    assert (err.value.node, err.value.task, err.value.rank) == ("gpu002", "1", None)


def test_torchrun_root_cause_gives_the_rank():
    report = ("1: Root Cause (first observed failure):\n1: [0]:\n1:   time      : 2026-12-01\n"
              "1:   host      : gpu002\n1:   rank      : 3 (local_rank: 1)\n"
              "1:   exitcode  : -9 (pid: 42)\n"
              "srun: error: gpu002: task 1: Exited with exit code 1\n")
    cmd = script(f"import sys; sys.stdout.write({report!r}); sys.exit(1)")
    with pytest.raises(NodeTaskFailed, match=r"workers failed: task 1 on node gpu002 \(rank 3\): "
                                             r"Exited with exit code 1;") as err:
        run_tasks(cmd, "workers")
    assert err.value.rank == 3


def test_output_passes_through_and_poll_runs_to_the_end(capfd):
    polls = []
    run_tasks(script("import time; print('a\\rb'); time.sleep(0.3); print('c')"), "x",
              poll=lambda: polls.append(1), every=0.1)
    assert capfd.readouterr().err == "a\rb\nc\n" and len(polls) >= 2
    with pytest.raises(NodeTaskFailed, match=r"x failed: a task: exit status 3;"):
        run_tasks(script("raise SystemExit(3)"), "x")


def fake_srun(seen_by_node):
    """srun replaced: run `python -m irpo.node_tasks ...` once per node, each node seeing
    the folders ``seen_by_node[node]`` maps to (a node whose map lacks one sees nothing)."""
    def run(cmd, **kwargs):
        args = cmd[cmd.index("irpo.node_tasks") + 1:]
        out, status = "", 0
        for node, seen in seen_by_node.items():
            token, *fields = args
            mapped = [f"{f.split('=')[0]}={seen.get(f.split('=', 1)[1], '/nonexistent')}" for f in fields]
            proc = subprocess.run([sys.executable, "-m", "irpo.node_tasks", token, *mapped],
                                  capture_output=True, text=True, env={"SLURMD_NODENAME": node},
                                  check=False)
            out, status = out + proc.stdout, status or proc.returncode
        return subprocess.CompletedProcess(cmd, status, out, "")
    return run


def test_shared_folders_pass_and_a_local_one_is_named(tmp_path):
    root, cache = tmp_path / "out", tmp_path / "cache"
    folders = {"output_root": root, "cache_dir": cache}
    everywhere = {str(p.resolve()): str(p.resolve()) for p in (root, cache)}
    check_shared(folders, 2, ALLOC, run=fake_srun({"gpu001": everywhere, "gpu002": everywhere}))
    only_cache = {str(cache.resolve()): str(cache.resolve())}
    with pytest.raises(ValueError, match=rf"^output_root={root.resolve()} is not visible from node "
                                         r"gpu002 \(of gpu001, gpu002\): put it on a file system"):
        check_shared(folders, 2, ALLOC, run=fake_srun({"gpu001": everywhere, "gpu002": only_cache}))
    assert not list(root.glob(".irpo-shared-check-*"))  # the tokens are removed again
