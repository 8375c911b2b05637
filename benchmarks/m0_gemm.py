"""What M0's reproducible build pays for its matrix products, and what another library would.

M0's build (irpo/builtin_build.py) pinned oneMKL to its COMPATIBLE branch so that Intel and
AMD CPUs give the same bits; matrix products are most of a pre-training step. This measurement
is why the build now uses OpenBLAS with named kernels (irpo/builtin_gemm.py). This times
the build's product shapes (4800 tokens, hidden 128, MLP 512) side by side, each
configuration in a child process of its own (the libraries read these switches when they
load), and records a checksum of every result, so that one run shows both the cost and
which configurations agree bit for bit:

* ``mkl-compatible``: the build before (``MKL_CBWR=COMPATIBLE``);
* ``mkl-avx2``: oneMKL's AVX2 branch, the build before that (Intel-only: oneMKL ignores it on AMD);
* ``mkl-default``: oneMKL's own dispatch (AVX-512 where the CPU has it);
* ``openblas-haswell`` and ``openblas-zen``: numpy's OpenBLAS with ``OPENBLAS_CORETYPE``
  set, whose kernels are chosen by that name, not by the CPU's vendor (``Zen`` names the
  same kernels as ``Haswell``); ``Haswell`` is the build today.

    python benchmarks/m0_gemm.py            # -> benchmarks/results/m0_gemm.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import cpu_name, load, versions  # benchmarks/ is on the path now

# (rows, inner, columns): the MLP's up and down products and their weight gradient, and a
# 128 x 128 attention projection, at the build's 32 sequences x ~150 tokens.
SHAPES = [(4800, 128, 512), (4800, 512, 128), (512, 4800, 128), (4800, 128, 128)]
CONFIGS = {
    "mkl-compatible": ("torch", {"MKL_CBWR": "COMPATIBLE"}),
    "mkl-avx2": ("torch", {"MKL_CBWR": "AVX2,STRICT"}),
    "mkl-default": ("torch", {}),
    "openblas-haswell": ("numpy", {"OPENBLAS_CORETYPE": "Haswell"}),
    "openblas-zen": ("numpy", {"OPENBLAS_CORETYPE": "Zen"}),
}
RESULTS = Path(__file__).parent / "results"


def measure(library: str, reps: int) -> list[dict]:
    """In the child: time each shape (median of ``reps``) and checksum its product."""
    import hashlib
    import statistics
    import time

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        an, bn = a.numpy(), b.numpy()
        product = _torch_product(a, b) if library == "torch" else _numpy_product(an, bn)
        product()  # warm-up: thread pools, buffers
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            c = product()
            times.append(time.perf_counter() - start)
        rows.append({"shape": f"{m}x{k}x{n}", "ms": round(statistics.median(times) * 1e3, 2),
                     "sha256": hashlib.sha256(c.numpy().tobytes()).hexdigest()[:16]})
    return rows


def _torch_product(a, b):
    return lambda: a @ b  # oneMKL, as torch.nn.Linear runs it on a CPU


def _numpy_product(a, b):
    import torch

    return lambda: torch.from_numpy(a @ b)  # numpy's OpenBLAS, the result shared with torch


def run_all(threads: list[int], reps: int) -> dict:
    out = {"cpu": cpu_name(), **versions("torch", "numpy"), "load_before": load(), "reps": reps,
           "results": []}
    for t in threads:
        for name, (library, env) in CONFIGS.items():
            child_env = {**os.environ, **env, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t),
                         "OPENBLAS_NUM_THREADS": str(t)}
            proc = subprocess.run([sys.executable, __file__, "--child", library, "--reps", str(reps)],
                                  env=child_env, capture_output=True, text=True, check=True)
            for row in json.loads(proc.stdout):
                out["results"].append({"config": name, "threads": t, **row})
    out["load_after"] = load()
    return out


def to_markdown(data: dict) -> str:
    head = (f"CPU: {data['cpu']}; torch {data['torch']}, numpy {data['numpy']}; "
            f"load {data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after; "
            f"median of {data['reps']}.")
    lines = [head, "",
             "| threads | shape | " + " | ".join(CONFIGS) + " |",
             "|---|---|" + "---|" * len(CONFIGS)]
    cells = {(r["threads"], r["shape"], r["config"]): r for r in data["results"]}
    for t, shape in sorted({(r["threads"], r["shape"]) for r in data["results"]}):
        row = [f"{cells[t, shape, c]['ms']} ms `{cells[t, shape, c]['sha256'][:8]}`" for c in CONFIGS]
        lines.append(f"| {t} | {shape} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--child", choices=["torch", "numpy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.reps)))
        return
    data = run_all(args.threads, args.reps)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "m0_gemm.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "m0_gemm.md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
