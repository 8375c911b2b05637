"""Shared test set-up: where the real benchmark data and the built model live.

Runs start from the shipped M0 (irpo/assets/tiny); builds of other model configs,
and DeepSpeed's compiled extensions, are cached under outputs/test-cache (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_CACHE = REPO / "outputs" / "test-cache"

os.environ.setdefault("IRPO_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("IRPO_CACHE_DIR", str(TEST_CACHE))


def run_main(args: list[str], output_root: Path, env: dict | None = None,
             check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run ``python -m irpo.main`` as a user would, in a subprocess."""
    # Flags (-m) first: Hydra's argparse rejects a flag between override words.
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "irpo.main", *flags, f"output_root={output_root}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    proc.log = proc.stdout + proc.stderr  # Hydra logs to stdout; errors go to stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The two modules that drive the SLURM test cluster share it (one cluster per machine).
_ONE_WORKER = {"test_slurm": "slurm", "test_two_nodes": "slurm"}


def pytest_collection_modifyitems(config, items):
    """For a run on pytest-xdist workers (``-n 2 --dist loadgroup``; not the default, see
    docs/testing.md): a test module stays on one worker, so its module fixtures (a vLLM
    engine, a built model) start once, and the SLURM modules share one, as they share one
    cluster. Without xdist the marks do nothing."""
    for item in items:
        name = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(_ONE_WORKER.get(name, name)))
