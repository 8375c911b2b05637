"""Run answer checks on untrusted text in worker processes that are bounded in time and memory.

Why a process and not math-verify's own timeouts: math-verify 0.9 bounds ``parse`` and ``verify``
with ``signal.alarm``, which (a) only works in the main thread (elsewhere it raises ValueError),
(b) counts whole seconds, per call, so one check can spend several of them, and (c) cannot stop
work that does not return to the interpreter. A worker process can be killed from any thread.

How a check is bounded (``limit_s``, 1 s by default):

* inside the worker, an interval timer (``setitimer``, sub-second) raises an exception the
  checkers cannot swallow (a BaseException) after ``limit_s - SOFT_MARGIN_S``: the usual way a
  slow sympy simplification ends, and the worker lives on;
* in the caller, a reply not read within ``limit_s`` gets the worker killed (SIGKILL) and a
  fresh one started at once, in the background, for the next check;
* the worker's address space is capped (``RLIMIT_AS``) so a ``10^{10^{10}}`` can only fail with
  MemoryError, not take the machine down.

Worker start-up (~0.5 s: importing sympy and math-verify) is not part of a check: the clock
starts when the request is sent to a ready worker. A worker that cannot start at all is an error
of the installation, raised as RuntimeError, never a silent "incorrect".

The pool knows its checks only as the functions its client hands it::

    pool = lazy_pool({"math_equal": answers_equal}, warm_up=warm_up)   # irpo.tasks.math
    pool().call("math_equal", pred, gold)

Only those functions run in a worker: the pool starts each worker as ``python -m
irpo.tasks.timeout '<spec>'``, the spec naming them by module and qualified name (so they
must be module-level functions), and the worker imports exactly those and runs ``warm_up``
once before it reports ready. Protocol: one JSON line per request ``{"f": name, "a": [args],
"t": soft_limit}`` -> ``{"ok": result}`` | ``{"timeout": 1}`` | ``{"error": "..."}``.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SOFT_MARGIN_S = 0.15
STARTUP_LIMIT_S = 60.0
MEMORY_LIMIT_BYTES = 4 << 30


class CheckTimeout(Exception):
    """The check did not finish within its limit (the caller treats it as 'incorrect')."""


class CheckError(Exception):
    """The check raised inside the worker, or the worker died (treated as 'incorrect')."""


def target(func: Callable) -> str:
    """``module:qualname`` of a module-level function: how a worker finds it."""
    name = f"{func.__module__}:{func.__qualname__}"
    if "<" in name or func.__module__ == "__main__":
        raise ValueError(f"a bounded check must be a module-level function of an importable "
                         f"module; got {name}")
    return name


def resolve(name: str) -> Callable:
    """The function a :func:`target` string names (imports its module)."""
    module, qualname = name.split(":")
    obj: Any = importlib.import_module(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    return obj


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, spec: str) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "irpo.tasks.timeout", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True,  # a Ctrl-C for the parent is not the worker's
        )
        self.buf = b""
        self.ready = False

    def _read_line(self, deadline: float) -> bytes | None:
        """One reply line, or None at the deadline; raises CheckError when the worker died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise CheckError(f"worker exited with code {self.proc.wait()}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def wait_ready(self) -> None:
        if not self.ready:
            line = self._read_line(time.monotonic() + STARTUP_LIMIT_S)
            if line != b"ready":
                raise RuntimeError(f"answer-check worker failed to start (got {line!r})")
            self.ready = True

    def call(self, request: bytes, limit_s: float) -> Any:
        self.proc.stdin.write(request)
        self.proc.stdin.flush()
        line = self._read_line(time.monotonic() + limit_s)
        if line is None:
            raise CheckTimeout(f"no answer within {limit_s:.2f}s")
        reply = json.loads(line)
        if "ok" in reply:
            return reply["ok"]
        if "timeout" in reply:
            raise CheckTimeout(f"stopped by the worker's timer within {limit_s:.2f}s")
        raise CheckError(reply.get("error", "unknown worker error"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class BoundedPool:
    """Workers shared by all threads of a process; each call gets one worker to itself.

    ``functions``: name -> module-level function, what :meth:`call` may run by name;
    ``warm_up``: a function each worker runs once at start-up (imports, caches), not timed.
    """

    def __init__(self, functions: dict[str, Callable], warm_up: Callable | None = None,
                 max_workers: int = 2, limit_s: float = 1.0):
        self.max_workers, self.limit_s = max_workers, limit_s
        self._spec = json.dumps({"functions": {k: target(f) for k, f in functions.items()},
                                 "warm_up": target(warm_up) if warm_up else None})
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._pid = os.getpid()
        self._all: list[_Worker] = []
        atexit.register(self.close)

    def _reset_after_fork(self) -> None:
        # A forked child must not share pipes with its parent's workers: start afresh.
        self._idle, self._count, self._all, self._pid = queue.LifoQueue(), 0, [], os.getpid()

    def _acquire(self) -> _Worker:
        if os.getpid() != self._pid:
            self._reset_after_fork()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._count < self.max_workers:
                self._count += 1
                worker = _Worker(self._spec)
                self._all.append(worker)
                return worker
        return self._idle.get()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.remove(worker)
            fresh = _Worker(self._spec)  # starts importing now, so the next check finds it ready
            self._all.append(fresh)
        self._idle.put(fresh)

    def warm(self) -> None:
        """Start every worker now and wait until each is ready (~0.5 s, once per process)."""
        workers = [self._acquire() for _ in range(self.max_workers)]
        for worker in workers:
            try:
                worker.wait_ready()
            finally:
                self._idle.put(worker)

    def call(self, func: str, *args: Any) -> Any:
        """Run ``functions[func](*args)`` in a worker within ``limit_s``; see the module doc."""
        worker = self._acquire()
        try:
            worker.wait_ready()
        except BaseException:
            self._replace(worker)
            raise
        request = json.dumps({"f": func, "a": list(args), "t": self.limit_s - SOFT_MARGIN_S})
        try:
            result = worker.call(request.encode() + b"\n", self.limit_s)
        except (CheckTimeout, CheckError, OSError, ValueError) as err:
            if isinstance(err, CheckTimeout) and "worker's timer" in str(err):
                self._idle.put(worker)  # it stopped itself cleanly and can go on
            else:
                self._replace(worker)
            if isinstance(err, (OSError, ValueError)):
                raise CheckError(f"worker protocol failure: {err}") from err
            raise
        except BaseException:  # KeyboardInterrupt mid-call: the worker's state is unknown
            self._replace(worker)
            raise
        self._idle.put(worker)
        return result

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            for worker in self._all:
                worker.kill()
            self._all, self._count = [], 0
            self._idle = queue.LifoQueue()


def lazy_pool(functions: dict[str, Callable], warm_up: Callable | None = None) -> Callable[[], BoundedPool]:
    """A function returning one process-wide pool for ``functions``, made on first use (so
    importing a client starts no worker); workers: ``IRPO_CHECK_WORKERS``, default 2."""
    made: list[BoundedPool] = []
    lock = threading.Lock()

    def get() -> BoundedPool:
        with lock:
            if not made:
                workers = int(os.environ.get("IRPO_CHECK_WORKERS", "2"))
                made.append(BoundedPool(functions, warm_up, max_workers=workers))
            return made[0]

    return get


# ------------------------------------------------------------------ worker side


class _SoftTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so that ``except Exception`` won't eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def hang(seconds: float) -> None:
    """Sleep with SIGALRM blocked: stands in for C code that never returns to the interpreter
    (the tests' check for the kill path)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def _serve(spec: dict) -> None:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):  # not permitted here: the parent's kill still bounds time
        pass
    signal.signal(signal.SIGALRM, _on_alarm)
    funcs = {name: resolve(path) for name, path in spec["functions"].items()}
    if spec["warm_up"]:
        resolve(spec["warm_up"])()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, max(0.01, float(req["t"])))
            try:
                reply = {"ok": funcs[req["f"]](*req["a"])}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            reply = {"timeout": 1}
        except BaseException as err:  # noqa: BLE001 - report every failure, keep serving
            reply = {"error": type(err).__name__}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
