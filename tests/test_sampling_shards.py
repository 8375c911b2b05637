"""The mechanics of sampling with one engine per node (irpo/sampling/shards.py), without an
engine: shard bounds, merging and its coverage checks, the allocation and shard-folder rules,
how a node starts its engine, and per-prompt request seeds. The same mechanics with a real
vLLM engine are in tests/test_sampling_vllm.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from irpo.launch import Allocation
from irpo.sampling import Generation
from irpo.sampling.shards import (
    check_allocation,
    merge_shards,
    run_shard,
    shard_bounds,
    shard_root,
    write_request,
)
from irpo.sampling.vllm import VLLMSamplerConfig, request_seed

CFG = VLLMSamplerConfig(name="vllm", enforce_eager=True, return_logprobs=True, cpu_kvcache_gib=1)


def test_shard_bounds_cover_every_prompt_once():
    for total in (0, 1, 7, 30, 31):
        for shards in (1, 2, 3, 8):
            spans = [shard_bounds(total, shards, k) for k in range(shards)]
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
            sizes = [e - s for s, e in spans]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="shard 2 of 2"):
        shard_bounds(5, 2, 2)


def test_merge_checks_coverage(tmp_path):
    gen = {"text": "x", "num_tokens": 1, "finished": True, "logprob": None}
    (tmp_path / "shard-0.jsonl").write_text(json.dumps({"index": 1, "samples": [gen]}) + "\n")
    (tmp_path / "shard-1.jsonl").write_text(json.dumps({"index": 0, "samples": [gen]}) + "\n")
    assert merge_shards(tmp_path, 2, 2) == [[Generation("x", 1, True)]] * 2
    with pytest.raises(RuntimeError, match="shard 2 of 3 wrote no"):
        merge_shards(tmp_path, 2, 3)
    with pytest.raises(RuntimeError, match="1 prompt.s. missing.*first index 2"):
        merge_shards(tmp_path, 3, 2)
    (tmp_path / "shard-1.jsonl").write_text(json.dumps({"index": 1, "samples": [gen]}) + "\n")
    with pytest.raises(RuntimeError, match="index 1 is out of range or already merged"):
        merge_shards(tmp_path, 2, 2)


def test_multi_node_needs_an_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="sampler.nodes=2 .* not in one"):
        check_allocation(2)
    with pytest.raises(ValueError, match="sampler.nodes=3: the allocation has 2 node"):
        check_allocation(3, Allocation("7", ("n1", "n2"), "10.0.0.1"))


def test_shard_root(tmp_path):
    (tmp_path / "m").mkdir()
    assert shard_root(None, str(tmp_path / "m")) == tmp_path / "vllm-shards"
    assert shard_root(str(tmp_path / "x"), "org/model") == tmp_path / "x"
    with pytest.raises(ValueError, match="set sampler.shard_dir"):
        shard_root(None, "org/model")


class EchoEngine:
    """An engine stand-in for the shard mechanics: prompt k's sample names its global index."""

    def __init__(self, request):
        self.request, self.closed = request, False

    def generate_ids(self, encoded, n, temperature, max_new_tokens, seed, first_index=0, desc=""):
        return [[Generation(f"{first_index + k}:{len(ids)}", 1, True)] * n for k, ids in enumerate(encoded)]

    def close(self):
        self.closed = True


def test_a_node_starts_its_engine_through_the_samplers_own_function(tmp_path):
    """run_shard knows no backend: it calls start_engine(request) (for vllm, the node entry
    point python -m irpo.sampling.vllm passes engine_from_request) and closes that engine."""
    import importlib.util

    from irpo.sampling.vllm import VLLMSampler

    assert importlib.util.find_spec(VLLMSampler.node_module).origin.endswith("irpo/sampling/vllm.py")
    sampler = type("S", (), {"cfg": dataclasses.replace(CFG, nodes=2), "model_path": "/m", "dtype": "f32"})
    request = write_request(tmp_path, sampler, [[1], [2, 3], [4, 5, 6]], 2, 1.0, 8, 0, 2, first_index=10)
    started = []

    def start_engine(req):
        started.append(EchoEngine(req))
        return started[-1]

    for shard in range(2):
        run_shard(request, shard, start_engine=start_engine)
    assert [e.request["model_path"] for e in started] == ["/m", "/m"] and all(e.closed for e in started)
    assert VLLMSamplerConfig(**started[0].request["sampler"]) == dataclasses.replace(CFG, nodes=2)
    merged = merge_shards(request.parent, 3, 2)
    assert [g[0].text for g in merged] == ["10:1", "11:2", "12:3"] and len(merged[0]) == 2
    run_shard(request, 0, start_engine=start_engine)  # a finished shard starts no engine
    assert len(started) == 2
    with pytest.raises(ValueError, match="give an engine .sampler. or a way to start one"):
        run_shard(request, 1)


def test_request_seeds_are_distinct_and_stable():
    seeds = {request_seed(s, i) for s in range(3) for i in range(2000)}
    assert len(seeds) == 6000 and max(seeds) < 2**62
    assert request_seed(1, 5) == request_seed(1, 5)
