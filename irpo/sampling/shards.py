"""Multi-node vLLM sampling: one engine per node over a contiguous shard of the prompts, merged.

Used by a sampler that runs one engine per node (:class:`irpo.sampling.vllm.VLLMSampler`
when ``sampler.nodes`` > 1 inside a SLURM allocation); this module knows the sampler only
through what it passes in. The driver writes the call (encoded prompts, n, temperature,
seed, the sampler config) to ``<shard_dir>/<id>/request.json`` (by default next to the
checkpoint, which every node reads) and runs, through :func:`irpo.launch.per_node_command`,
the sampler's node entry point (``sampler.node_module``; its ``__main__`` calls :func:`main`
with a function that starts one node's engine from the request)::

    srun --nodes=N --ntasks-per-node=1 ... python -m irpo.sampling.vllm <request.json>

Task k (SLURM_PROCID) starts its own engine (tensor parallel over its node's
GPUs), generates prompts ``shard_bounds(P, N, k)`` seeded by their global
index, and writes ``shard-k.jsonl`` atomically; the driver then merges the N
files back into prompt order. Because every prompt's seed depends only on its
global index, a sharded call returns what one engine would have returned.

Each node's shard resumes by itself. The request's folder is named by a hash of
the request, so a rerun of the same stage (a re-queued job) finds it again. A
node works through its shard in chunks of ``sampler.chunk_size`` prompts,
committed to ``shard-k.tmp/chunks/`` (irpo.chunks) with one engine kept for the
whole shard; a rerun skips the shards whose ``shard-k.jsonl`` exists and the
chunks already committed, so a killed node loses at most its chunk in flight.
The folder is removed once the shards are merged; folders of requests that were
never rerun (a changed config) stay in ``shard_dir`` until removed by hand.

By hand, e.g. to re-run shard 1 of 2 of a failed call::

    python -m irpo.sampling.vllm outputs/vllm-shards/<id>/request.json --shard 1
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from irpo.sampling import Generation

log = logging.getLogger(__name__)

# A node's engine from a request (dict of request.json): the sampler's own start-up.
StartEngine = Callable[[dict], Any]


def shard_bounds(num_prompts: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, end) of shard ``shard``: contiguous, sizes differing by at most one."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards")
    base, extra = divmod(num_prompts, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (shard < extra)


def check_allocation(nodes: int, alloc: Any = None) -> Any:
    """The SLURM allocation that ``sampler.nodes`` engines run in (error if there is none)."""
    from irpo.launch import Allocation

    alloc = Allocation.from_env() if alloc is None else alloc
    if alloc is None:
        raise ValueError(f"sampler.nodes={nodes} runs one vLLM engine per node of a SLURM "
                         "allocation, but this process is not in one; use sampler.nodes=1")
    if len(alloc.nodes) < nodes:
        raise ValueError(f"sampler.nodes={nodes}: the allocation has {len(alloc.nodes)} node(s)")
    return alloc


def shard_root(shard_dir: str | None, model_path: str) -> Path:
    """Where requests and shards go: ``shard_dir``, else next to the checkpoint (which
    every node reads anyway, so it is on a shared file system)."""
    if shard_dir is not None:
        return Path(shard_dir).resolve()
    model = Path(model_path)
    if not model.is_dir():
        raise ValueError(f"sampler.nodes > 1 with model {model_path!r} (not a local directory): "
                         "set sampler.shard_dir to a directory every node can read and write")
    return model.resolve().parent / "vllm-shards"


def request_dir(root: Path, request: dict) -> Path:
    """The request's folder under ``root``: named by its content, so a rerun finds it."""
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / digest


def write_request(root: Path, sampler: Any, encoded: list[list[int]], n: int, temperature: float,
                  max_new_tokens: int, seed: int, num_shards: int, first_index: int = 0) -> Path:
    """The call, as every node's task reads it, in its folder under ``root`` (kept if there).

    ``first_index``: where the call's prompts start in the stage (irpo.chunks).
    """
    cfg = dataclasses.asdict(sampler.cfg) if dataclasses.is_dataclass(sampler.cfg) else dict(sampler.cfg)
    request = {"model_path": sampler.model_path, "dtype": sampler.dtype, "sampler": cfg,
               "prompts": encoded, "n": n, "temperature": temperature,
               "max_new_tokens": max_new_tokens, "seed": seed, "num_shards": num_shards,
               "first_index": first_index}
    work = request_dir(root, request)
    path = work / "request.json"
    if path.is_file():
        log.info("resuming the sharded call in %s", work)
        return path
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(request))
    os.replace(tmp, path)
    return path


def shard_path(request_path: Path, shard: int) -> Path:
    return Path(request_path).with_name(f"shard-{shard}.jsonl")


def run_shard(request_path: Path, shard: int, sampler: Any = None,
              start_engine: StartEngine | None = None) -> Path:
    """Generate shard ``shard`` of a request into ``shard-<shard>.jsonl`` (atomically).

    Works in committed chunks (irpo.chunks) that a rerun reuses; a finished shard is
    not redone. ``sampler`` is an engine to use (tests); else ``start_engine(request)``
    starts one here, and only if something is left to generate.
    """
    from irpo.chunks import discard_chunks, run_chunks

    if sampler is None and start_engine is None:
        raise ValueError("run_shard: give an engine (sampler) or a way to start one (start_engine)")

    out = shard_path(request_path, shard)
    if out.is_file():
        log.info("shard %d: already done (%s), skipped", shard, out)
        return out
    req = json.loads(Path(request_path).read_text())
    start, end = shard_bounds(len(req["prompts"]), req["num_shards"], shard)
    engine = [sampler]

    def one_chunk(first: int, part: list[list[int]]) -> list[dict]:
        if engine[0] is None:
            engine[0] = start_engine(req)
        gens = engine[0].generate_ids(
            part, req["n"], req["temperature"], req["max_new_tokens"], req["seed"],
            first_index=req.get("first_index", 0) + start + first,
            desc=f"shard {shard}/{req['num_shards']} {first}-{first + len(part)}/{end - start}")
        return [{"index": start + first + i, "samples": [dataclasses.asdict(g) for g in gs]}
                for i, gs in enumerate(gens)]

    stage = out.with_suffix(".tmp")
    try:
        records = run_chunks(stage, req["prompts"][start:end], req["sampler"]["chunk_size"],
                             one_chunk, f"shard{shard}")
    finally:
        if sampler is None and engine[0] is not None:
            engine[0].close()
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out)
    discard_chunks(stage)
    stage.rmdir()
    return out


def merge_shards(work: Path, num_prompts: int, num_shards: int) -> list[list[Generation]]:
    """The shards' generations in prompt order; every prompt exactly once."""
    merged: list[list[Generation] | None] = [None] * num_prompts
    for k in range(num_shards):
        path = Path(work) / f"shard-{k}.jsonl"
        if not path.is_file():
            raise RuntimeError(f"sampling shard {k} of {num_shards} wrote no {path}")
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            i = rec["index"]
            if not 0 <= i < num_prompts or merged[i] is not None:
                raise RuntimeError(f"{path}: prompt index {i} is out of range or already merged")
            merged[i] = [Generation(**g) for g in rec["samples"]]
    missing = [i for i, g in enumerate(merged) if g is None]
    if missing:
        raise RuntimeError(f"{len(missing)} prompt(s) missing from the shards in {work}, "
                           f"first index {missing[0]}")
    return merged  # type: ignore[return-value]


def generate_on_nodes(sampler: Any, encoded: list[list[int]], n: int, temperature: float,
                      max_new_tokens: int, seed: int, alloc: Any = None,
                      run=None, first_index: int = 0) -> list[list[Generation]]:
    """One engine per node of the allocation over a shard each; the merged result.

    Each node runs ``python -m <sampler.node_module> <request.json>`` (see the module doc).
    ``run(cmd, check=True)`` replaces srun in tests; by default a failed node raises
    irpo.node_tasks.NodeTaskFailed naming the node, the task and the log.
    """
    from irpo.launch import per_node_command

    nodes = sampler.cfg.nodes
    alloc = check_allocation(nodes, alloc)
    root = shard_root(sampler.cfg.shard_dir, sampler.model_path)
    request = write_request(root, sampler, encoded, n, temperature, max_new_tokens, seed, nodes,
                            first_index)
    if all(shard_path(request, k).is_file() for k in range(nodes)):
        log.info("every shard of %s is done (an earlier attempt); merging", request.parent)
    else:
        cmd = per_node_command(["-m", sampler.node_module, str(request.resolve())],
                               nodes=nodes, alloc=alloc)
        log.info("sampling on %d nodes: %s", nodes, " ".join(cmd))
        if run is None:
            from irpo.node_tasks import run_tasks

            run_tasks(cmd, f"sampling on {nodes} nodes ({request.parent})")
        else:
            run(cmd, check=True)
    gens = merge_shards(request.parent, len(encoded), nodes)
    shutil.rmtree(request.parent, ignore_errors=True)
    return gens


def main(start_engine: StartEngine, prog: str, args: Sequence[str] | None = None) -> None:
    """One node's task: the command line of a sampler's node entry point (``prog``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("request", type=Path)
    parser.add_argument("--shard", type=int, default=None,
                        help="which shard (default: SLURM_PROCID, one task per node)")
    ns = parser.parse_args(args)
    shard = ns.shard if ns.shard is not None else int(os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO)
    log.info("shard %d on node %s (SLURM task %s)", shard,
             os.environ.get("SLURMD_NODENAME", os.uname().nodename), os.environ.get("SLURM_PROCID", "-"))
    print(run_shard(ns.request, shard, start_engine=start_engine))
