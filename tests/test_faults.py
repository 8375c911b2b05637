"""Nothing lost, nothing doubled: kills, a concurrent launch and tracking-server outages
end with the artifacts and MLflow histories of a run that never failed.

Real processes (``python -m irpo.main``), the real MLflow sqlite store and a real
``mlflow server`` on 127.0.0.1 that the tests stop and start. Histories are compared
key by key: same keys, same steps, each step once, same values (timings: same steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main
from mlflow_helpers import (
    MlflowServer,
    assert_each_once,
    comparable,
    mlflow_history,
    recorded_history,
)

from irpo.tasks.arith import ArithConfig

pytestmark = pytest.mark.slow
SMOKE = ["experiment=smoke"]
TINY = SMOKE + ["dataset.train_size=16", "dataset.test_size=8"]
# A step checkpoint every 2 steps: the kill at step 3 resumes training after step 2.
# Chunks of 16 prompts: 3 of the 48 training prompts, 2 of the 32 test prompts.
STEP_CKPT = SMOKE + ["trainer.save_every_steps=2", "sampler.chunk_size=16"]


def run_name(seed: int) -> str:
    """The MLflow run name of the smoke config with this seed (α: the arithmetic task's default)."""
    return f"rpo β=0.1 α={ArithConfig().alpha:g} seed={seed}"


RUN_NAME = run_name(0)
# Kill points in order: after each stage's DONE, and once in the middle of training.
KILLS = [("IRPO_KILL_AFTER_CHUNK", "iter0/eval:0"), ("IRPO_KILL_AFTER_STAGE", "iter0/eval"),
         ("IRPO_KILL_AFTER_CHUNK", "iter1/sample:1"), ("IRPO_KILL_AFTER_STAGE", "iter1/sample"),
         ("IRPO_KILL_AFTER_STAGE", "iter1/label"), ("IRPO_KILL_AFTER_STAGE", "iter1/data"),
         ("IRPO_KILL_AT_TRAIN_STEP", "3"), ("IRPO_KILL_AFTER_STAGE", "iter1/train")]


def the_run_dir(root: Path) -> Path:
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run


def start_main(args: list[str], root: Path, log: Path) -> subprocess.Popen:
    """``python -m irpo.main`` in the background (run_main's command line)."""
    cmd = [sys.executable, "-m", "irpo.main", f"output_root={root}", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kills_and_a_concurrent_launch_leave_an_uninterrupted_runs_history(tmp_path):
    clean_root, killed_root = tmp_path / "clean", tmp_path / "killed"
    # The uninterrupted run, and a second launch of the same config while it runs.
    first = start_main(STEP_CKPT, clean_root, tmp_path / "clean.log")
    wait_for(lambda: list(clean_root.glob("runs/*/run.lock")), first)
    second = run_main(STEP_CKPT, clean_root, check=False, timeout=300)
    assert second.returncode != 0
    assert "error: run in progress" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=1800) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    clean = the_run_dir(clean_root)
    assert not (clean / "run.lock").exists()

    for env_key, where in KILLS:
        proc = run_main(STEP_CKPT, killed_root, env={env_key: where}, check=False)
        assert proc.returncode == -9, proc.log[-3000:]
        if where == "iter1/train":  # the attempt after the mid-training kill
            assert "resuming training after step 2" in proc.log
        if where == "iter0/eval":  # the attempts after a kill inside a sample or eval stage
            assert "iter0/eval: 1 of 2 chunks were committed by an earlier attempt" in proc.log
        if where == "iter1/sample":
            assert "iter1/sample: 2 of 3 chunks were committed by an earlier attempt" in proc.log
    run_main(STEP_CKPT, killed_root)
    run = the_run_dir(killed_root)
    assert run.name == clean.name
    assert not (run / "iter1/train/resume").exists()  # step checkpoints go with the stage

    # Artifacts: byte-identical, the trained weights included.
    for f in ("iter1/sample/samples.jsonl", "iter1/label/labelled.jsonl", "iter1/data/train.jsonl",
              "iter1/train/model/model.safetensors", "iter1/eval/predictions.jsonl"):
        assert digest(run / f) == digest(clean / f), f

    # MLflow: one run each, named for what it is, every (key, step) once, equal histories.
    (want,) = mlflow_history(sqlite_uri(clean_root)).items()
    (got,) = mlflow_history(sqlite_uri(killed_root)).items()
    assert got[0] == want[0] == RUN_NAME
    assert got[1]["status"] == want[1]["status"] == "FINISHED"
    assert got[1]["tags"]["config_hash"] == run.name.rsplit("-", 1)[1]
    for h in (want[1]["metrics"], got[1]["metrics"]):
        assert_each_once(h)
    assert comparable(got[1]["metrics"]) == comparable(want[1]["metrics"])
    steps = json.loads((run / "iter1/train/DONE").read_text())["steps"]
    assert [s for s, _ in got[1]["metrics"]["train/loss"]] == list(range(1, steps + 1))
    assert [s for s, _ in got[1]["metrics"]["test/accuracy"]] == [0, 1]
    assert {"sample/prompts", "data/data_examples", "train/steps", "peak_rss_mb"} <= set(got[1]["metrics"])
    # The run directory is the record and MLflow its exact mirror (timings included).
    assert recorded_history(run) == got[1]["metrics"]
    assert recorded_history(clean) == want[1]["metrics"]


def test_tracking_none_records_everything_and_sync_publishes_it_once(tmp_path):
    run_main(TINY + ["tracking=none"], tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
    run = the_run_dir(tmp_path)
    record = recorded_history(run)
    steps = json.loads((run / "iter1/train/DONE").read_text())["steps"]
    assert [s for s, _ in record["train/loss"]] == list(range(1, steps + 1))
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    for attempt in range(2):  # the second sync adds nothing
        proc = subprocess.run([sys.executable, "-m", "irpo.sync", str(run), "--tracking-uri", uri],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        published = int(proc.stdout.split(" newly published")[0].rsplit(" ", 1)[1])
        assert published == (sum(map(len, record.values())) if attempt == 0 else 0), proc.stdout
    ((name, got),) = mlflow_history(uri).items()
    assert name == RUN_NAME and got["status"] == "FINISHED"
    assert got["metrics"] == record


def test_server_down_at_start_fails_fast_when_asked(tmp_path):
    server = MlflowServer(tmp_path / "server")  # never started: nothing listens on its port
    start = time.monotonic()
    proc = run_main(TINY + [f"tracking.tracking_uri={server.uri}", "tracking.on_unavailable=fail"],
                    tmp_path, check=False, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: MLflow at {server.uri} did not answer (MlflowException: "
                      + errors[0].split("(MlflowException: ", 1)[1]]
    assert errors[0].endswith("tracking.on_unavailable=fail")
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - start < 120  # seconds of retries, not MLflow's default 4 minutes


def test_server_outages_lose_nothing(tmp_path):
    """Down at start then back mid-run; up at start then down to the end, synced later."""
    server = MlflowServer(tmp_path / "server")
    opts = [f"tracking.tracking_uri={server.uri}", "tracking.retry_every_s=1"]
    try:
        # 1. Nothing answers at start: the run goes on; the server comes back while it samples
        # (the run is held meanwhile: on an idle machine it would finish before the server is up).
        root = tmp_path / "late"
        proc = start_main(TINY + opts + ["seed=1", "tracking.flush_timeout_s=60"], root,
                          tmp_path / "late.log")
        wait_for(lambda: list(root.glob("runs/*/iter1/sample.tmp")), proc)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            server.start()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=1800) == 0
        log = (tmp_path / "late.log").read_text()
        assert f"MLflow at {server.uri} did not answer" in log
        hist = mlflow_history(server.uri)
        assert hist[run_name(1)]["metrics"] == recorded_history(the_run_dir(root))
        assert hist[run_name(1)]["status"] == "FINISHED"

        # 2. The server dies while the run samples and stays down past its end.
        root = tmp_path / "down"
        proc = start_main(TINY + opts + ["seed=2", "tracking.flush_timeout_s=5"], root,
                          tmp_path / "down.log")
        wait_for(lambda: list(root.glob("runs/*/iter1/sample.tmp")), proc)
        server.stop()
        assert proc.wait(timeout=1800) == 0
        run = the_run_dir(root)
        log = (tmp_path / "down.log").read_text()
        assert "metrics not published yet" in log and f"python -m irpo.sync {run}" in log
        server.start()
        sync = subprocess.run([sys.executable, "-m", "irpo.sync", str(run)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr
        got = mlflow_history(server.uri)[run_name(2)]
        assert got["status"] == "FINISHED"
        assert_each_once(got["metrics"])
        assert got["metrics"] == recorded_history(run)
    finally:
        server.stop()


# A handler standing in for submitit's (re-queue the job, exit -1), installed before the run
# as submitit installs it, and SLURM's time-limit warning sent once the run has returned.
LATE_WARNING = """
import atexit, os, runpy, signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: os._exit(7))
def late_warning():
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.5)  # the handler would run here
atexit.register(late_warning)
sys.argv = ["irpo.main", *sys.argv[1:]]
runpy.run_module("irpo.main", run_name="__main__")  # python -m irpo.main
"""


def test_a_time_limit_warning_after_the_run_ends_leaves_the_job_completed(tmp_path):
    """The last attempt of a re-queued SLURM job can finish inside the warning window
    (test_slurm's time-limit test): a SIGUSR2 that arrives after the run is complete must
    neither re-queue the job nor kill it (SLURM would record FAILED), so the process exits 0."""
    cmd = [sys.executable, "-c", LATE_WARNING, f"output_root={tmp_path}", *TINY, "tracking=none"]
    env = {**os.environ, "SUBMITIT_FOLDER": str(tmp_path / "submitit")}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (the_run_dir(tmp_path) / "iter1" / "eval" / "DONE").exists()
    # Outside a submitit job the warning keeps its meaning (the handler in place acts).
    del env["SUBMITIT_FOLDER"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 7, proc.stderr[-3000:]
