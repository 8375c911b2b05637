"""``launcher=slurm`` on a real SLURM cluster: a sweep as array jobs, a job
that hits its time limit and resumes, a stage launched across nodes.

The cluster is the one slurm/start.sh builds on this machine (slurmctld,
two slurmd as two nodes, slurmdbd, MariaDB, munge). The session fixture starts
it and stops it afterwards, unless one is already running in
$IRPO_SLURM_DIR (default /tmp/irpo-slurm), which is used and left running.
Starting needs root on Debian (it installs the apt packages when missing);
elsewhere these tests skip. Run them alone with

    .venv/bin/python -m pytest tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main
from omegaconf import OmegaConf

from irpo.config import register_configs, to_config
from irpo.launch import Allocation, check, per_node_command, stage_command

register_configs()

STATE = Path(os.environ.get("IRPO_SLURM_DIR", "/tmp/irpo-slurm"))
# The test cluster's names (slurm/start.sh) and sizes that fit any machine:
# one CPU per job so that both sweep points run at once on two cores.
ON_TEST_CLUSTER = ["hydra.launcher.partition=debug", "hydra.launcher.account=irpo",
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
STAGES = ["iter0/eval", "iter1/sample", "iter1/label", "iter1/data", "iter1/train", "iter1/eval"]


def _cluster_answers(env: dict) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], check=False, env=env, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running test cluster (started here if none is up)."""
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        pytest.skip("the SLURM test cluster (slurm/start.sh) needs root on Debian")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError:
        pytest.fail("hydra-submitit-launcher is missing: pip install -e '.[slurm]'")
    conf = str(STATE / "etc" / "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    started = False
    if not ((STATE / ".irpo-slurm").exists() and _cluster_answers(env)):
        subprocess.run([str(REPO / "slurm" / "start.sh"), "--nodes", "2", str(STATE)],
                       check=True, timeout=900)
        started = True
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # seen by run_main's subprocesses, sbatch and the jobs
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if started:
        subprocess.run([str(REPO / "slurm" / "stop.sh"), str(STATE)], check=True, timeout=300)


def sacct(job_id: str, duplicates: bool = False) -> list[tuple[str, str]]:
    """(JobID, State) of a job's allocations once they have ended (with
    ``duplicates``, of every attempt). The result file that submitit waits for
    is written before the job ends, so this polls until SLURM has caught up."""
    cmd = ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd + (["-D"] if duplicates else []), capture_output=True,
                             text=True, check=True, timeout=60).stdout
        rows = [tuple(line.split("|")) for line in out.splitlines() if line]
        if rows and not {"PENDING", "RUNNING", "COMPLETING"} & {state for _, state in rows}:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still not ended for sacct: {rows}")
        time.sleep(1)


def submitted(root: Path) -> list[str]:
    """Ids of the SLURM jobs (or array tasks) the sweep under ``root`` submitted."""
    return sorted(p.name for p in root.glob("hydra/multirun/*/*/.submitit/*")
                  if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name))


def submitit_jobs(root: Path) -> dict[str, str]:
    """SLURM job id -> its log, for each job the sweep under ``root`` submitted."""
    logs = sorted(root.glob("hydra/multirun/*/*/.submitit/*/*_log.out"))
    return {p.parent.name: p.read_text() for p in logs}


def mlflow_runs(root: Path) -> list[dict]:
    con = sqlite3.connect(root / "mlflow.db")
    runs = []
    for run_id, status in con.execute("select run_uuid, status from runs"):
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)))
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)))
        steps = [s for (s,) in con.execute(
            "select step from metrics where run_uuid=? and key='train/loss' order by step", (run_id,))]
        runs.append({"status": status, "tags": tags, "params": params, "train_loss_steps": steps})
    return runs


def compose(overrides: list[str], hydra_node: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides, return_hydra_config=hydra_node)


def launcher_params(name: str, overrides: list[str]) -> dict:
    """The composed ``hydra.launcher`` node of launcher ``name`` (minus the launcher's own keys)."""
    cfg = compose([f"launcher={name}", *overrides], hydra_node=True)
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    return {k: v for k, v in node.items() if k not in ("_target_", "submitit_folder")}


def slurm_executor(params: dict, folder: Path):
    """The executor hydra-submitit-launcher builds from ``params`` (as in its launch())."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(params)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor


@pytest.mark.parametrize("name", ["slurm", "slurm_paper"])
def test_launcher_config_composes_into_a_one_task_sbatch_script(name, tmp_path, slurm_cluster):
    """Both launchers compose. The paper one asks SLURM for 8 nodes x 8 GPUs
    while submitit (and so the driver) sees a single task. (submitit's executor wants
    ``srun`` on the PATH: the cluster fixture installs SLURM on a fresh machine.)"""
    params = launcher_params(name, ["hydra.launcher.partition=gpu"])
    assert params["nodes"] == 1 and params["tasks_per_node"] == 1
    assert params["max_num_timeout"] > 0
    assert params["timeout_min"] * 60 > 2 * params["signal_delay_s"]
    executor = slurm_executor(params, tmp_path)
    assert executor._executor._num_tasks() == 1
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "u")
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --ntasks-per-node=1" in script
    assert f"#SBATCH --signal=USR2@{params['signal_delay_s']}" in script
    assert "export SLURM_NTASKS=1 SLURM_NNODES=1" in script  # one driver, however many nodes
    if name == "slurm_paper":
        for line in ("--nodes=8", "--gpus-per-node=8", "--exclusive", "--mem=0"):
            assert f"#SBATCH {line}\n" in script, line


def test_stage_commands_in_an_allocation_and_outside():
    alloc = Allocation("4242", ("gpu001", "gpu002", "gpu003"), "10.1.0.1")
    srun = ["srun", "--overlap", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1",
            "--nodelist=gpu001,gpu002,gpu003", "--kill-on-bad-exit=1", "--label"]
    assert stage_command(["-m", "stage", "dir"], 8, alloc=alloc, python="py") == [
        *srun, "py", "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=3",
        "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.0.1:29742", "--rdzv-id=4242",
        "-m", "stage", "dir"]
    two = stage_command(["s.py"], 8, nodes=2, alloc=alloc, python="py")
    assert "--nodelist=gpu001,gpu002" in two and "--nnodes=2" in two  # the head node is in
    assert per_node_command(["-m", "sampler"], alloc=alloc, python="py") == [
        *srun, "py", "-m", "sampler"]
    assert stage_command(["-m", "stage"], 2, alloc=None, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "stage"]
    assert per_node_command(["-m", "sampler"], alloc=None, python="py") == ["py", "-m", "sampler"]
    with pytest.raises(ValueError, match="has 3 node"):
        stage_command(["s.py"], 8, nodes=4, alloc=alloc)
    with pytest.raises(ValueError, match="outside a SLURM allocation"):
        stage_command(["s.py"], 8, nodes=2, alloc=None)


@pytest.mark.slow
def test_stage_launch_without_slurm(tmp_path, monkeypatch):
    """Outside an allocation the same stage runs as local torchrun workers."""
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    result = check(str(tmp_path), procs_per_node=2, stages=1)
    (stage,) = result["stages"]
    assert [(r["rank"], r["world_size"], r["rank_sum"], r["node"]) for r in stage] == [
        (0, 2, 1.0, "local"), (1, 2, 1.0, "local")]
    assert "--standalone" in result["command"]


@pytest.mark.slow
@pytest.mark.slurm
def test_stage_launch_across_nodes(tmp_path, slurm_cluster):
    """A job shaped by launcher=slurm, on every node of the cluster, runs the
    driver once; irpo.launch starts 2 torchrun workers per node that all-reduce."""
    nodes = int(subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True,
                               check=True).stdout.split()[0])
    params = launcher_params("slurm", ON_TEST_CLUSTER)
    params["additional_parameters"] = {"nodes": nodes}
    job = slurm_executor(params, tmp_path / "submitit" / "%j").submit(
        check, str(tmp_path / "stages"), 2)
    result = job.result()
    assert job.num_tasks == 1 and result["driver_ntasks"] == "1"
    assert len(result["allocation_nodes"]) == nodes
    assert result["command"][:2] == ["srun", "--overlap"]
    for stage in result["stages"]:  # two stages in a row: the rendezvous port is reusable
        assert [r["rank"] for r in stage] == list(range(2 * nodes))
        assert {r["world_size"] for r in stage} == {2 * nodes}
        assert {r["rank_sum"] for r in stage} == {sum(range(2 * nodes))}
        assert {r["node"] for r in stage} == set(result["allocation_nodes"])
    assert sacct(job.job_id) == [(job.job_id, "COMPLETED")]


@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_runs_as_slurm_array_jobs(tmp_path, slurm_cluster):
    """The user's sweep command with launcher=slurm: one array job, a task per
    point, each an MLflow run, both starting from the shipped built-in model."""
    # hydra.mode=MULTIRUN is -m (run_main puts output_root first, and -m must lead).
    run_main(["hydra.mode=MULTIRUN", "launcher=slurm", "method=rpo,dpo", "experiment=smoke",
              *ON_TEST_CLUSTER], tmp_path, timeout=1100)
    jobs = submitit_jobs(tmp_path)
    assert len(jobs) == 2, jobs.keys()
    array = {j.split("_")[0] for j in jobs}
    assert len(array) == 1, "the two sweep points are one array job"
    assert sorted(sacct(array.pop())) == sorted((j, "COMPLETED") for j in jobs)

    runs = mlflow_runs(tmp_path)
    assert sorted(r["tags"]["method"] for r in runs) == ["dpo", "rpo"]
    assert {r["status"] for r in runs} == {"FINISHED"}
    # The jobs saw the submitting shell's environment: the shared cache directory.
    assert {r["params"]["cache_dir"] for r in runs} == {os.environ["IRPO_CACHE_DIR"]}
    # ... and one M0, the shipped file, checked and loaded by both; nothing built.
    from irpo.builtin_model import shipped_model_dir

    assert not any("building the built-in model" in log for log in jobs.values())
    m0 = {re.search(r"loaded (\S+/assets/tiny) ", log).group(1) for log in jobs.values()}
    assert len(m0) == 1 and Path(m0.pop()).resolve() == shipped_model_dir("tiny").resolve()


def train_losses(run: Path) -> list[float]:
    return [json.loads(line)["metrics"]["train/loss"]
            for line in (run / "iter1/train/metrics.jsonl").read_text().splitlines()]


def mlflow_loss_history(root: Path) -> list[tuple[int, float]]:
    con = sqlite3.connect(root / "mlflow.db")
    return list(con.execute("select step, value from metrics where key='train/loss' order by step"))


# A train stage of 45-140 s (about 460 steps of 0.1-0.3 s, one thread) against a 1-minute
# limit, of which an attempt trains 10-40 s: at least two attempts even on an idle machine.
# (Each attempt after the first costs about 45 s of waiting: the re-queue's credential expiry
# and the job's start.)
LONG_TRAIN = ["method=rpo", "experiment=smoke", "trainer.epochs=45"]


@pytest.mark.slow
@pytest.mark.slurm
def test_train_stage_longer_than_the_time_limit_completes(tmp_path, slurm_cluster):
    """A job whose time limit (1 min) is shorter than its own train stage: every attempt
    is stopped by SLURM's warning signal (USR2; slurmctld checks limits every 30 s and
    signals once the limit is closer than signal_delay_s + 30 s, so an attempt runs 28-58 s
    and trains for 10-40 s of it), the stage in flight saves a step
    checkpoint and submitit re-queues the job; the next attempt resumes after that step.
    Without resumption inside the stage every attempt would start training from step 1
    and the job would be re-queued until max_num_timeout ran out.

    The run ends with the artifacts and the MLflow history of an uninterrupted run of the
    same config (launcher=local, one thread like the job's one CPU), run alongside.
    """
    from irpo.builtin_model import ensure_builtin_model

    cfg = to_config(compose(["experiment=smoke"]))
    ensure_builtin_model(cfg.model, cfg.dataset, cfg.cache_dir)
    job_root, local_root = tmp_path / "slurm", tmp_path / "local"
    sweep_cmd = [sys.executable, "-m", "irpo.main", "-m", f"output_root={job_root}",
                 "launcher=slurm", *LONG_TRAIN, *ON_TEST_CLUSTER, "hydra.launcher.timeout_min=1",
                 "hydra.launcher.signal_delay_s=2", "hydra.launcher.max_num_timeout=30"]
    local_cmd = [sys.executable, "-m", "irpo.main", f"output_root={local_root}", *LONG_TRAIN]
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "sweep.log", "w") as out, open(tmp_path / "local.log", "w") as lout:
        sweep = subprocess.Popen(sweep_cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        local = subprocess.Popen(local_cmd, cwd=REPO, stdout=lout, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert local.wait(timeout=1200) == 0, (tmp_path / "local.log").read_text()[-3000:]
            sweep.wait(timeout=1500)
        finally:
            if sweep.poll() is None:  # a failed test leaves no job behind
                sweep.kill()
                subprocess.run(["scancel", *submitted(job_root)], check=False)
            if local.poll() is None:
                local.kill()
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-5000:]
    ((job_id, log),) = submitit_jobs(job_root).items()
    attempts = [state for _, state in sacct(job_id, duplicates=True)]
    assert attempts.count("REQUEUED") >= 1 and attempts[-1] == "COMPLETED", attempts
    # (submitit's lines appear up to three times, through its logger and Hydra's)
    signalled = re.findall(r"^\[[^]]+\]\[submitit\]\[WARNING\] - Caught signal SIGUSR2", log, re.M)
    assert len(signalled) == attempts.count("REQUEUED"), signalled
    assert "saving a step checkpoint at the end of this step" in log
    # Training went on from where each attempt stopped.
    resumed = [int(n) for n in re.findall(r"resuming training after step (\d+)", log)]
    assert len(resumed) == attempts.count("REQUEUED"), resumed
    assert resumed == sorted(set(resumed)) and resumed[0] >= 2, resumed
    assert f"Requeued job {job_id}" in log and "iteration 1 sample: done already, skipped" in log

    (run,) = [p for p in (job_root / "runs").iterdir() if p.is_dir()]
    (ref,) = [p for p in (local_root / "runs").iterdir() if p.is_dir()]
    for stage in STAGES:
        assert (run / stage / "DONE").exists(), stage
    steps = json.loads((run / "iter1/train/DONE").read_text())["steps"]
    assert resumed[-1] < steps
    assert train_losses(run) == train_losses(ref) and len(train_losses(run)) == steps
    from safetensors.torch import load_file

    mine, theirs = (load_file(r / "iter1/train/model/model.safetensors") for r in (run, ref))
    assert all(mine[k].equal(theirs[k]) for k in theirs) and mine.keys() == theirs.keys()
    for name in ("iter1/eval/predictions.jsonl", "iter1/sample/samples.jsonl"):
        assert (run / name).read_text() == (ref / name).read_text(), name
    assert mlflow_loss_history(job_root) == mlflow_loss_history(local_root)  # each step once
    assert [s for s, _ in mlflow_loss_history(job_root)] == list(range(1, steps + 1))
    (mlflow_run,) = mlflow_runs(job_root)  # every attempt logs into the same run
    assert mlflow_run["status"] == "FINISHED"
