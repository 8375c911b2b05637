"""Timing and machine facts shared by the benchmarks.

Every result file says where and how it was measured; these are the pieces each benchmark
assembles under its own keys (kept as they were, so old results stay comparable)::

    t = clocks(); ...; wall, cpu = since(t)
    {"cpu": cpu_name(), "usable_cpus": usable_cpus(), "load_average_start": load(), ...}

On a machine shared with other jobs wall time is inflated by contention and CPU time much
less, hence both clocks; ``load()`` beside a number says how busy the machine was.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds, after the GPU's queued work: kernels queued before the mark
    belong to the interval being timed. CPU time counts only the host side on a GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds from ``start`` (a :func:`clocks` mark) to now."""
    end = clocks()
    return end[0] - start[0], end[1] - start[1]


def peak_rss_mib() -> float:
    """Peak RSS of this process image. Not ru_maxrss: that keeps the parent's peak across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """Which of the vector extensions that matter for the kernels this CPU has."""
    flags = (_cpuinfo("flags") or "").split()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def usable_cpus() -> int:
    """Cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0))


def load() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def memory_gib() -> float:
    """The machine's total memory."""
    with open("/proc/meminfo") as f:
        return round(int(f.readline().split()[1]) / 2**20, 1)


def versions(*modules: str) -> dict[str, str]:
    """``{name: __version__}`` of the given importable modules."""
    import importlib

    return {name: importlib.import_module(name).__version__ for name in modules}


def machine(**extra) -> dict:
    """The facts most results record, under the keys they use (cpu, logical_cpus,
    usable_cpus, python, torch), then ``extra``: a benchmark's own keys and values."""
    import torch

    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "python": platform.python_version(), "torch": torch.__version__, **extra}
