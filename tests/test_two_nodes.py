"""experiment=rehearsal_2node on the two-node SLURM test cluster: the paper's topology
(one vLLM engine per node over a shard of the prompts, DeepSpeed ZeRO-3 across both
nodes, one driver per job) end to end, a node that dies mid-stage, and a folder that
only one node sees.

The cluster is slurm/start.sh --nodes 2 (fixture ``slurm_cluster`` of test_slurm.py):
two slurmd on this machine, node 2 in a mount namespace where
``<state>/node-local`` is a folder of its own. Run alone with

    .venv/bin/python -m pytest tests/test_two_nodes.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_slurm import (  # noqa: F401  (slurm_cluster: a fixture)
    ON_TEST_CLUSTER,
    STATE,
    compose,
    mlflow_runs,
    slurm_cluster,
    submitit_jobs,
)

from irpo.config import to_config

LOSS_TOL = 1e-5
STAGES = ["iter0/eval", "iter1/sample", "iter1/label", "iter1/data", "iter1/train", "iter1/eval"]


def submit(root: Path, *overrides: str, env: dict | None = None, timeout: int = 1500):
    """The user's command with launcher=slurm_2node; waits for the job (submitit's -m)."""
    cmd = [sys.executable, "-m", "irpo.main", "-m", f"output_root={root}",
           "experiment=rehearsal_2node", *ON_TEST_CLUSTER, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def job_log(root: Path, attempt: int) -> tuple[str, str]:
    """(job id, log) of the ``attempt``-th job submitted under ``root`` (0-based)."""
    jobs = sorted(submitit_jobs(root).items(), key=lambda kv: int(kv[0].split("_")[0]))
    return jobs[attempt]


def run_dir(root: Path) -> Path:
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run


def samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "iter1/sample/samples.jsonl").read_text().splitlines()]


def first_step(run: Path) -> dict:
    return json.loads((run / "iter1/train/metrics.jsonl").read_text().splitlines()[0])["metrics"]


@pytest.fixture(scope="module")
def m0():
    from irpo.builtin_model import ensure_builtin_model

    cfg = to_config(compose(["experiment=smoke"]))
    return ensure_builtin_model(cfg.model, cfg.dataset, cfg.cache_dir)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_folder_one_node_cannot_see_fails_before_the_first_stage(tmp_path, slurm_cluster, m0):  # noqa: F811
    local_only = STATE / "node-local" / tmp_path.name  # node 2 sees its own empty tmpfs there
    done = submit(local_only, timeout=600)
    assert done.returncode != 0
    (_, log) = job_log(local_only, 0)
    assert re.search(rf"output_root={re.escape(str(local_only))} is not visible from node "
                     rf"\S+-2 \(of \S+, \S+-2\): put it on a file system every node mounts", log), log[-3000:]
    assert not (local_only / "runs").exists() or not any((local_only / "runs").glob("*/iter0"))


def reference_run(root: Path) -> subprocess.Popen:
    """The same experiment on one node, without SLURM: one engine, two DeepSpeed workers
    (the same world size, so the same batches per rank)."""
    cmd = [sys.executable, "-m", "irpo.main", f"output_root={root}", "experiment=rehearsal_2node",
           "launcher=local", "sampler.nodes=1", "trainer.num_processes=2"]
    root.mkdir(parents=True)
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(root / "run.log", "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_rehearsal_survives_a_lost_node_and_matches_one_node(tmp_path, slurm_cluster, m0):  # noqa: F811
    """Node 2's engine dies (SIGKILL) after its first committed chunk of the first sharded
    call: the job fails with an error naming the node, the task and the log. The same
    command again completes, redoing neither a finished shard nor a committed chunk, and
    its artifacts are those of the same experiment on one node."""
    root = tmp_path / "two"
    failed = submit(root, env={"IRPO_KILL_AFTER_CHUNK": "shard1:0"})
    assert failed.returncode != 0
    _, log = job_log(root, 0)
    error = re.compile(r"sampling on 2 nodes \(\S+\) failed: task 1 on node \S+-2: Killed; its "
                       r"output is in (\S+), lines starting with \"1: \"")
    assert error.search(failed.stdout + failed.stderr), failed.stderr[-3000:]
    named = error.search(log)  # the job's own log says it too, and names itself
    assert named and Path(named[1]).is_file() and str(root) in named[1], log[-4000:]
    (request,) = (root / "vllm-shards").iterdir()  # the call in flight is kept for the rerun
    shard0_done = (request / "shard-0.jsonl").is_file()
    assert (request / "shard-1.tmp/chunks/0.jsonl").is_file()

    reference = reference_run(tmp_path / "one")
    done = submit(root)
    assert reference.wait(timeout=1500) == 0, (tmp_path / "one/run.log").read_text()[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, log = job_log(root, 1)
    if shard0_done:
        assert "shard 0: already done" in log
    assert re.search(r"shard1: 1 of \d+ chunks were committed by an earlier attempt, reused", log)
    nodes = [re.search(rf"^{k}: .*shard {k} on node (\S+) \(SLURM task {k}\)", log, re.MULTILINE) for k in (0, 1)]
    assert nodes[0] and nodes[1] and nodes[1][1] == nodes[0][1] + "-2", log[-4000:]
    # torchrun's rendezvous, not the node order, decides which node holds rank 0
    ranks = re.findall(r"^(\d): .*deepspeed rank (\d) of 2 on node (\S+) ", log, re.MULTILINE)
    assert sorted(r for _, r, _ in ranks) == ["0", "1"], log[-4000:]
    assert {(task, node) for task, _, node in ranks} == {("0", nodes[0][1]), ("1", nodes[1][1])}
    assert not any((root / "vllm-shards").iterdir())

    two, one = run_dir(root), run_dir(tmp_path / "one")
    for stage in STAGES:
        assert (two / stage / "DONE").exists(), stage
    # Samples: every prompt once, in order; seeded by global index, so the sharded
    # engines write what one engine writes (log-probs within vLLM's CPU float noise).
    a, b = samples(two), samples(one)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    texts = lambda rs: [[s["text"] for s in r["samples"]] for r in rs]
    assert texts(a) == texts(b)
    # (a sample cut at max_new_tokens carries no log-prob, on both sides alike)
    lps = [(x.get("logprob"), y.get("logprob")) for r, q in zip(a, b)
           for x, y in zip(r["samples"], q["samples"])]
    assert all((x is None) == (y is None) for x, y in lps)
    assert max(abs(x - y) for x, y in lps if x is not None) < 1e-4
    # Training across two nodes: the first step's loss of the one-node DeepSpeed run.
    assert abs(first_step(two)["train/loss"] - first_step(one)["train/loss"]) < LOSS_TOL
    for t in (0, 1):
        greedy = [json.loads(line)["greedy"] for line in
                  (two / f"iter{t}/eval/predictions.jsonl").read_text().splitlines()]
        assert greedy == [json.loads(line)["greedy"] for line in
                          (one / f"iter{t}/eval/predictions.jsonl").read_text().splitlines()]
    (run,) = mlflow_runs(root)
    assert run["status"] == "FINISHED"
