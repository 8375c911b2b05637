"""One writer per run directory: a lock file that works across nodes.

Two drivers writing the same run directory (a re-submitted SLURM job next to
the original, or a manual rerun) would interleave stages and corrupt it. The
driver holds ``<run_dir>/run.lock`` while it runs. The file is created
atomically (hard link of a complete temp file, so it also works on NFS where
flock may not), holds who owns it as readable JSON, and has its mtime touched
by a heartbeat thread. A later process that finds the lock decides whether
its owner is dead (same host and pid gone or reused, the same or a finished
SLURM job, or a heartbeat older than ``stale_after_s``) and only then takes
it over, through a short-lived ``run.lock.break`` file so that only one of
several racing processes can win.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import psutil

log = logging.getLogger("irpo.runlock")

LOCK_NAME = "run.lock"
BREAKER_STALE_S = 60.0  # a breaker is held for milliseconds; older means its holder died
UNREADABLE_GRACE_S = 5.0  # an unreadable lock may be a racing writer mid-write
CREATE_TIME_TOLERANCE_S = 1.0  # psutil's boot time can drift by a second between processes
SQUEUE_TIMEOUT_S = 10.0
# squeue states in which the process that wrote the lock cannot be running: the
# job ended, or was requeued and waits (a new attempt will start from scratch).
SLURM_DEAD_STATES = {"PENDING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                     "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REQUEUED",
                     "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "REVOKED"}


class RunInProgress(RuntimeError):
    """Another live process holds the run directory's lock."""


def read_lock(path) -> dict | None:
    """The lock's JSON content, or None if it is missing or unreadable."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def slurm_job_id() -> str | None:
    """This process's SLURM job id; array tasks as ``<array job>_<task>``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_finished(job_id: str) -> bool | None:
    """True if SLURM says the job is no longer running, False if it is, None if unknown."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False,
                              capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no squeue here, or the controller is too slow to ask
    if proc.returncode != 0:
        # slurmctld forgets finished jobs (MinJobAge) and then calls the id invalid.
        return True if "invalid job id" in (proc.stdout + proc.stderr).lower() else None
    states = proc.stdout.split()  # nothing: the job left the queue
    return not states or states[0] in SLURM_DEAD_STATES


def stale_reason(info: dict | None, mtime: float, stale_after_s: float) -> str | None:
    """Why the lock with this content and mtime is stale, or None if its owner may be alive."""
    age = time.time() - mtime
    if info is None:
        return f"unreadable and untouched for {age:.0f} s" if age > UNREADABLE_GRACE_S else None
    pid = info.get("pid")
    if info.get("host") == socket.gethostname():  # decisive: we can see this host's processes
        try:
            proc = psutil.Process(int(pid))
            created, zombie = proc.create_time(), proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return f"pid {pid} is gone"
        except (psutil.Error, TypeError, ValueError):
            return None  # cannot tell; assume alive rather than steal a live lock
        if zombie:  # exited, not yet reaped by its parent
            return f"pid {pid} has exited"
        recorded = info.get("create_time")
        if recorded is not None and abs(created - float(recorded)) > CREATE_TIME_TOLERANCE_S:
            return f"pid {pid} now belongs to a newer process"
        return None
    job = info.get("slurm_job_id")
    if job:
        if str(job) == slurm_job_id():
            return f"SLURM job {job} was re-queued (this process is its new attempt)"
        if slurm_job_finished(str(job)):
            return f"SLURM job {job} is no longer running"
    # squeue may say "running" for a job whose driver crashed and whose script
    # went on to other work, so a dead heartbeat is still trusted here.
    if age > stale_after_s:
        return f"heartbeat is {age:.0f} s old (limit {stale_after_s:.0f} s)"
    return None


def _describe(path: Path, info: dict | None) -> str:
    if info is None:
        return (f"run in progress: {path} is being written by another process (unreadable); "
                "wait for it, or remove the lock if no process is using it")
    job = f" (SLURM job {info['slurm_job_id']})" if info.get("slurm_job_id") else ""
    return (f"run in progress: {path} is held by pid {info.get('pid')} on host "
            f"{info.get('host')} since {info.get('started')}{job}; "
            "wait for it, or remove the lock if that process is gone")


def _create_exclusive(path: Path, content: str) -> bool:
    """Create ``path`` with ``content`` only if it does not exist; True if we did."""
    # Write a complete private file first and hard-link it into place: link
    # fails atomically if the name exists, also on NFS, and readers never see
    # a half-written lock. A lost NFS reply can make link() report failure
    # after it succeeded, so the link count of the temp file is the verdict.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(content)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                return os.stat(tmp).st_nlink == 2
        else:
            return True
    finally:
        tmp.unlink(missing_ok=True)
    # No hard links on this filesystem: O_EXCL, where a reader may briefly see
    # a half-written file (stale_reason gives such a file a grace period).
    try:
        with open(path, "x") as f:
            f.write(content)
    except FileExistsError:
        return False
    return True


def _remove_if(path: Path, is_expected) -> bool:
    """Remove ``path`` if ``is_expected(file)`` holds for the very file removed."""
    # Checking and then unlinking by name could delete a file that replaced the
    # one checked. Renaming it aside first pins the inode; a wrong one is linked
    # back (if a newer file took the name meanwhile, that one stands).
    moved = path.with_name(f"{path.name}.{uuid.uuid4().hex}.old")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    try:
        if is_expected(moved):
            return True
        with contextlib.suppress(OSError):
            os.link(moved, path)
        return False
    finally:
        moved.unlink(missing_ok=True)


class RunLock:
    """Holds ``<run_dir>/run.lock`` for this process, with a heartbeat."""

    def __init__(self, run_dir: Path, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s}, "
                             f"{stale_after_s}: a live lock must not look stale")
        self.run_dir = Path(run_dir)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._token: str | None = None
        self._owner_pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _content(self) -> str:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "create_time": psutil.Process().create_time(),  # tells a reused pid apart
            "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "slurm_job_id": slurm_job_id(),
            "token": self._token,
            "argv": sys.argv,
            "heartbeat_s": self.heartbeat_s,
        }
        return json.dumps(info, indent=1) + "\n"

    def acquire(self) -> Self:
        """Take the lock, taking over a stale one; raise RunInProgress if it is live."""
        if self._token and self._owner_pid == os.getpid() and \
                (read_lock(self.path) or {}).get("token") == self._token:
            return self  # already ours
        self._stop_heartbeat()
        self._token = uuid.uuid4().hex
        self.run_dir.mkdir(parents=True, exist_ok=True)
        content = self._content()
        # Waiting only happens while another process holds the breaker, which
        # takes milliseconds unless it died (then the breaker expires).
        deadline = time.monotonic() + BREAKER_STALE_S + 10
        while not _create_exclusive(self.path, content):
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                continue  # released between our attempt and the look: try again
            info = read_lock(self.path)
            reason = stale_reason(info, st.st_mtime, self.stale_after_s)
            won = None if reason is None else self._take_over(st, info, reason, content)
            if won:
                break
            if reason is None or time.monotonic() > deadline:
                self._token = None
                raise RunInProgress(_describe(self.path, read_lock(self.path) or info))
            time.sleep(0.05)
        self._owner_pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, seen: os.stat_result, info: dict | None, reason: str,
                   content: str) -> bool | None:
        """Replace the stale lock ``seen``: True if we did, None to look again."""
        breaker = self.path.with_name(self.path.name + ".break")
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self._token})
        if not _create_exclusive(breaker, mine):
            # Someone else is taking over right now, or died doing it long ago.
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(breaker)
                if time.time() - st.st_mtime > BREAKER_STALE_S and _remove_if(
                        breaker, lambda p: os.stat(p).st_ino == st.st_ino):
                    log.warning("removed %s, left by a process that died taking over", breaker)
            return None
        try:
            # Someone may have replaced or refreshed the lock before we got the
            # breaker; then our verdict is outdated and the caller looks again.
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return None
            if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
                return None
            if not _remove_if(self.path, lambda p: os.stat(p).st_ino == seen.st_ino):
                return None
            if not _create_exclusive(self.path, content):
                return None  # the name was free for a moment and a newcomer took it
            owner = info or {}
            log.info("took over stale lock %s of pid %s on host %s (SLURM job %s, since %s): %s",
                     self.path, owner.get("pid"), owner.get("host"), owner.get("slurm_job_id"),
                     owner.get("started"), reason)
            return True
        finally:
            _remove_if(breaker, lambda p: p.read_text() == mine)

    def _beat(self) -> None:
        # Touch only our own lock: keeping a newcomer's lock fresh after a
        # (wrong) takeover would hide the conflict instead of reporting it.
        while not self._stop.wait(self.heartbeat_s):
            info = read_lock(self.path)
            if info is not None and info.get("token") == self._token:
                with contextlib.suppress(OSError):  # transient (NFS): the next beat retries
                    os.utime(self.path)
            elif info is not None or not self.path.exists():  # else a transient read error
                log.warning("lock %s is no longer ours; heartbeat stopped", self.path)
                return

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if self._token is None or self._owner_pid != os.getpid():
            return  # never held, or a forked child: the parent still owns the lock
        self._stop_heartbeat()
        token = self._token
        if not _remove_if(self.path, lambda p: (read_lock(p) or {}).get("token") == token):
            log.warning("lock %s was no longer ours at release; left in place", self.path)
        self._token = None
        self._owner_pid = None
