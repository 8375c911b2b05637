"""The run directory lock: one writer, stale locks taken over, races won once.

Other processes are real subprocesses (``python -c``) on the real filesystem.
squeue is faked by a script put first on PATH, which is enough to check how
its answers are read; tests/test_slurm.py is where real SLURM jobs run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from irpo import runlock
from irpo.runlock import RunInProgress, RunLock, read_lock, slurm_job_id

REPO = Path(__file__).resolve().parents[1]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")

# A contender: for each run directory in turn, waits for EOF on its pipe `go`
# (if given), tries the lock and prints HELD or BUSY <message>; holds what it
# won until the file `stop` appears. Closing a pipe's write end wakes all its
# readers at once: the tightest start processes can get.
CONTENDER = r"""
import os, sys, time
from pathlib import Path
from irpo.runlock import RunInProgress, RunLock
stop, rounds = sys.argv[1], sys.argv[2:]
print("READY", flush=True)
held = []
for run_dir, go in zip(rounds[::2], rounds[1::2]):
    if go != "-":
        os.read(int(go), 1)
    try:
        held.append(RunLock(Path(run_dir)).acquire())
        print("HELD", flush=True)
    except RunInProgress as e:
        print("BUSY", e, flush=True)
while stop != "-" and not Path(stop).exists():
    time.sleep(0.01)
for lock in held:
    lock.release()
"""
RACE_ROUNDS = 12


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    # The suite itself may run inside a SLURM job; these tests set what they need.
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)


def start_contender(run_dirs: list[Path], gos: list[int] | None = None,
                    stop: Path | str = "-") -> subprocess.Popen:
    gos = gos or []
    args = [str(a) for pair in zip(run_dirs, gos or ["-"] * len(run_dirs)) for a in pair]
    proc = subprocess.Popen([sys.executable, "-c", CONTENDER, str(stop), *args], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, pass_fds=gos)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def contend(run_dir: Path) -> str:
    """Another process's answer: 'HELD' (it took the lock and let it go) or 'BUSY <why>'."""
    proc = start_contender([run_dir])
    out = proc.stdout.read().strip()
    proc.wait(timeout=30)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(run_dir: Path, age_s: float = 0.0, raw: str | None = None, **fields) -> Path:
    """Write a lock as another process would have left it, with an mtime age_s old."""
    info = {"host": socket.gethostname(), "create_time": time.time() - 50,
            "started": "2026-12-01T07:40:02Z", "slurm_job_id": None,
            "token": uuid.uuid4().hex, "argv": ["irpo.main"], **fields}
    info.setdefault("pid", dead_pid() if raw is None else 0)
    path = run_dir / "run.lock"
    path.write_text(json.dumps(info, indent=1) if raw is None else raw)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def fake_squeue(tmp_path: Path, monkeypatch, body: str | None) -> Path:
    """Put a fake squeue running `body` (None: no squeue at all) alone on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if body is not None:
        script = bin_dir / "squeue"
        script.write_text(f'#!/bin/sh\necho "$@" >> {bin_dir}/calls\n{body}\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def test_acquire_writes_readable_owner_and_shuts_out_other_processes(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        info = read_lock(lock.path)
        assert lock.path == tmp_path / "run.lock"
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["create_time"] == psutil.Process().create_time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["started"])
        assert info["slurm_job_id"] is None and info["argv"] == sys.argv
        assert re.fullmatch(r"[0-9a-f]{32}", info["token"])
        assert lock.path.read_text().startswith('{\n "host"')  # indent=1, for people
        assert lock.acquire() is lock and read_lock(lock.path) == info  # idempotent

        answer = contend(tmp_path)
        assert answer.startswith("BUSY run in progress: ")
        for part in (str(lock.path), f"pid {os.getpid()}", f"host {socket.gethostname()}",
                     info["started"], "remove the lock if that process is gone"):
            assert part in answer
        assert read_lock(lock.path) == info
    finally:
        lock.release()
    assert not lock.path.exists()
    assert contend(tmp_path) == "HELD"
    assert os.listdir(tmp_path) == []  # no temp files or breaker left behind


def test_slurm_job_id_names_array_tasks(monkeypatch):
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4415")
    assert slurm_job_id() == "4415"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4411")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "4411_3"


def test_message_names_the_slurm_job(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, None)
    plant(tmp_path, host="node7", pid=123, slurm_job_id="4411")
    with pytest.raises(RunInProgress) as err:
        RunLock(tmp_path).acquire()
    assert str(err.value) == (
        f"run in progress: {tmp_path / 'run.lock'} is held by pid 123 on host node7 since "
        "2026-12-01T07:40:02Z (SLURM job 4411); wait for it, or remove the lock if that "
        "process is gone")


@pytest.mark.parametrize("reaped", [True, False])
def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog, reaped):
    holder = start_contender([tmp_path], stop=tmp_path / "never")
    assert holder.stdout.readline().strip() == "HELD"
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait(timeout=10)
    else:  # a zombie: dead, but its parent (this test) has not collected it yet
        while psutil.Process(holder.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
    assert read_lock(tmp_path / "run.lock")["pid"] == holder.pid  # left behind

    with caplog.at_level(logging.INFO, logger="irpo.runlock"):
        lock = RunLock(tmp_path).acquire()
    assert read_lock(lock.path)["pid"] == os.getpid()
    [line] = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line
    assert ("is gone" if reaped else "has exited") in line
    lock.release()
    holder.wait(timeout=10)


def test_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        plant(tmp_path, pid=sleeper.pid, create_time=started)
        with pytest.raises(RunInProgress, match=f"pid {sleeper.pid} "):
            RunLock(tmp_path).acquire()  # the very process that wrote it: alive

        plant(tmp_path, pid=sleeper.pid, create_time=started - 3600)
        with RunLock(tmp_path) as lock:  # same pid, another process: stale
            assert read_lock(lock.path)["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_this_very_slurm_job_is_a_requeue_and_taken_over(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, None)
    plant(tmp_path, host="node7", pid=123, slurm_job_id="4411_3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4411")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with RunLock(tmp_path) as lock:
        assert read_lock(lock.path)["slurm_job_id"] == "4411_3"
        assert read_lock(lock.path)["pid"] == os.getpid()


# How each squeue answer about the lock's job (on another host, fresh
# heartbeat) is read: finished jobs' locks are taken over, others refused.
SQUEUE_ANSWERS = {
    "not installed": (None, False),
    "prints nothing": ("exit 0", True),
    "invalid job id": ('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', True),
    "completed": ("echo COMPLETED", True),
    "running": ("echo RUNNING", False),
    "controller down": ('echo "slurm_load_jobs error: Unable to contact" >&2; exit 1', False),
    "hangs": ("exec sleep 5", False),
}


@pytest.mark.parametrize("answer", SQUEUE_ANSWERS)
def test_squeue_answers(tmp_path, monkeypatch, answer):
    body, taken = SQUEUE_ANSWERS[answer]
    bin_dir = fake_squeue(tmp_path, monkeypatch, body)
    monkeypatch.setattr(runlock, "SQUEUE_TIMEOUT_S", 0.5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plant(run_dir, host="node7", pid=123, slurm_job_id="4411")
    lock = RunLock(run_dir)
    if taken:
        lock.acquire().release()
    else:
        with pytest.raises(RunInProgress, match="pid 123 on host node7"):
            lock.acquire()
        plant(run_dir, age_s=700, host="node7", pid=123, slurm_job_id="4411")
        lock.acquire().release()  # but a heartbeat 700 s old is trusted over squeue
    if body is not None:
        assert (bin_dir / "calls").read_text().splitlines()[0] == "-h -j 4411 -o %T"


def test_other_host_without_slurm_goes_by_heartbeat(tmp_path):
    plant(tmp_path, age_s=30, host="node7", pid=123)
    with pytest.raises(RunInProgress, match="node7"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    plant(tmp_path, age_s=90, host="node7", pid=123)
    RunLock(tmp_path, stale_after_s=60).acquire().release()


def test_unreadable_lock_waits_for_its_writer_then_is_stale(tmp_path):
    plant(tmp_path, raw='{"host": "nod')
    with pytest.raises(RunInProgress, match="unreadable"):
        RunLock(tmp_path).acquire()
    plant(tmp_path, age_s=10, raw='{"host": "nod')
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("stale", ["dead pid", "old heartbeat", "unreadable"])
def test_only_one_of_racing_processes_takes_over(tmp_path, stale):
    # 8 processes, each racing for RACE_ROUNDS directories in turn: one process
    # start per contender buys many rounds, and a takeover race that is lost
    # only now and then (the window is about a millisecond) still shows.
    run_dirs = [tmp_path / f"run{i}" for i in range(RACE_ROUNDS)]
    for run_dir in run_dirs:
        run_dir.mkdir()
        if stale == "dead pid":
            plant(run_dir)
        elif stale == "old heartbeat":
            plant(run_dir, age_s=700, host="node7", pid=123)
        else:
            plant(run_dir, age_s=10, raw="")
    pipes = [os.pipe() for _ in run_dirs]
    stop, procs = tmp_path / "stop", []
    try:
        procs += [start_contender(run_dirs, [r for r, _ in pipes], stop) for _ in range(8)]
        for run_dir, (_, start) in zip(run_dirs, pipes, strict=True):
            os.close(start)  # go
            answers = [p.stdout.readline().split()[0] for p in procs]
            assert (answers.count("HELD"), answers.count("BUSY")) == (1, 7), f"{run_dir}: {answers}"
    finally:
        for fd in (fd for pair in pipes for fd in pair):
            with contextlib.suppress(OSError):
                os.close(fd)  # lets the contenders finish even after a failure
        stop.touch()
        for p in procs:
            p.wait(timeout=30)
    for run_dir in run_dirs:
        assert os.listdir(run_dir) == []  # the winner released; nothing else left behind


def test_breaker_left_by_a_dead_taker_expires(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "BREAKER_STALE_S", 1.0)
    plant(tmp_path)
    (tmp_path / "run.lock.break").write_text("{}")  # its writer died mid-takeover
    t0 = time.monotonic()
    with RunLock(tmp_path):
        assert 0.9 < time.monotonic() - t0 < 5  # waited for the breaker to expire
    assert os.listdir(tmp_path) == []


def _release_in_child(lock: RunLock) -> None:
    lock.release()


def test_release_never_removes_someone_elses_lock(tmp_path, caplog):
    lock = RunLock(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()
    child = multiprocessing.get_context("fork").Process(target=_release_in_child, args=(lock,))
    child.start()
    child.join(timeout=30)
    assert read_lock(lock.path)["pid"] == os.getpid()  # a forked child does not release it

    theirs = plant(tmp_path, pid=12345, host="node7")  # as if taken over behind our back
    their_info = read_lock(theirs)
    with caplog.at_level(logging.WARNING, logger="irpo.runlock"):
        time.sleep(0.5)  # the heartbeat notices it lost the lock
        lock.release()
    assert read_lock(theirs) == their_info
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]
    assert any("no longer ours; heartbeat stopped" in r.getMessage() for r in caplog.records)
    assert any("no longer ours at release" in r.getMessage() for r in caplog.records)
    RunLock(tmp_path).release()  # never acquired: nothing to do


def test_heartbeat_refreshes_mtime_until_release(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.2, stale_after_s=5).acquire()
    old = time.time() - 100
    os.utime(lock.path, (old, old))
    time.sleep(0.6)
    assert lock.path.stat().st_mtime > time.time() - 1
    lock.release()
    assert not lock.path.exists()
    assert not [t for t in threading.enumerate() if t.name == "runlock-heartbeat"]


def test_heartbeat_must_be_shorter_than_the_stale_limit(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_s"):
        RunLock(tmp_path, heartbeat_s=60, stale_after_s=30)
