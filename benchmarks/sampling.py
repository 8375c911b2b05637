"""Sampling throughput: the ``hf`` sampler against ``vllm``, N samples per prompt, two model sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling.py [--quick] [--out benchmarks/results/sampling]

For each model -- the built-in M0 (trained, ~1M parameters) and a randomly
initialised Llama of ~25M parameters with the same tokenizer and head_dim 32 --
both samplers are built once (their start-up is reported on its own: vLLM's
import, engine construction and first call; hf's load and first call), then
for N in {1, 8, 30} the two backends generate for the same arithmetic prompts
at temperature 1, alternating which goes first, ``--repeats`` times. Reported:
generated tokens/s and samples/s (median over repeats) and the vllm/hf ratio.
Both run the samplers as the loop does (irpo.sampling, the project's default
sampler configs), on the GPU when there is one (vLLM's CUDA build), else CPU.

The machine is shared with other jobs, so absolute numbers move with the load
(the 1-minute load average is recorded next to every measurement); ratios
between the alternating backends are the robust result. Writes ``<out>.json``
(every number) and ``<out>.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import cpu_isa, gpu_name, memory_gib, versions
from measure import load as current_load
from measure import machine as machine_facts

NS = (1, 8, 30)
# Prompts per call for each N: about 100-250 sequences per call, so vLLM's
# continuous batching and hf's padded batches both have work to batch.
PROMPTS = {"tiny": {1: 128, 8: 24, 30: 8}, "llama-25m": {1: 48, 8: 8, 30: 2}}
MAX_NEW_TOKENS = 96  # dataset=arith's default
BIG = {"hidden_size": 512, "num_layers": 8, "num_heads": 16, "intermediate_size": 1408}


def machine() -> dict:
    import torch

    return machine_facts(isa=cpu_isa(), **versions("transformers", "vllm"),
                         OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                         torch_threads=torch.get_num_threads(), gpu=gpu_name(), mem_gib=memory_gib())


def models(cache: Path) -> dict[str, Path]:
    """name -> checkpoint: M0 (built or cached) and the random 25M Llama (built here)."""
    from hydra import compose, initialize_config_dir

    from irpo.builtin_model import build_model, ensure_builtin_model
    from irpo.config import register_configs, to_config
    from irpo.modeling import load_tokenizer

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = to_config(compose("config"))
    tiny = ensure_builtin_model(cfg.model, cfg.dataset, cfg.cache_dir)
    big = cache / "llama-h512-l8"
    if not (big / "config.json").exists():
        import dataclasses

        tok = load_tokenizer(tiny)
        model = build_model(dataclasses.replace(cfg.model, **BIG), tok)
        tmp = big.with_name(big.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(big)
    return {"tiny": tiny, "llama-25m": big}


def prompts(count: int) -> list[str]:
    from irpo.tasks.arith import ArithConfig, build_arith

    data = ArithConfig(train_size=0, valid_size=0, test_size=count)
    return [e.prompt for e in build_arith(data).load_split("test")]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def start_samplers(path: Path, dtype: str) -> tuple[dict, dict]:
    """{"hf": sampler, "vllm": sampler} and their start-up times."""
    import torch

    from irpo.sampling.hf import HFSampler, HFSamplerConfig
    from irpo.sampling.vllm import VLLMSampler, VLLMSamplerConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    warm = prompts(4)
    hf, load = timed(lambda: HFSampler(str(path), HFSamplerConfig(name="hf", device=device), dtype))
    _, hf_first = timed(lambda: hf.generate(warm, 1, 1.0, 16, seed=0))
    vcfg = VLLMSamplerConfig(name="vllm", enforce_eager=device == "cpu")
    vl, start = timed(lambda: VLLMSampler(str(path), vcfg, dtype))
    _, vl_first = timed(lambda: vl.generate(warm, 1, 1.0, 16, seed=0))
    startup = {"hf": {"load_s": load, "first_call_s": hf_first},
               "vllm": {"engine_s": start, "first_call_s": vl_first, "in_process": vl.in_process}}
    return {"hf": hf, "vllm": vl}, startup


def measure(sampler, texts: list[str], n: int, seed: int) -> dict:
    load = current_load()[0]
    gens, wall = timed(lambda: sampler.generate(texts, n, 1.0, MAX_NEW_TOKENS, seed=seed, desc="bench"))
    tokens = sum(g.num_tokens for gs in gens for g in gs)
    return {"wall_s": wall, "tokens": tokens, "samples": len(texts) * n,
            "tokens_per_s": tokens / wall, "samples_per_s": len(texts) * n / wall,
            "mean_tokens": tokens / (len(texts) * n), "load_1min": load}


def bench_model(name: str, path: Path, repeats: int, dtype: str, quick: bool) -> dict:
    samplers, startup = start_samplers(path, dtype)
    rows = []
    try:
        for n in NS:
            count = max(1, PROMPTS[name][n] // (4 if quick else 1))
            texts = prompts(count)
            runs = {"hf": [], "vllm": []}
            for rep in range(repeats):
                order = ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")
                for backend in order:
                    runs[backend].append(measure(samplers[backend], texts, n, seed=rep))
            med = {b: statistics.median(r["tokens_per_s"] for r in runs[b]) for b in runs}
            rows.append({"model": name, "n": n, "prompts": count, "runs": runs,
                         "hf_tokens_per_s": med["hf"], "vllm_tokens_per_s": med["vllm"],
                         "ratio_vllm_over_hf": med["vllm"] / med["hf"],
                         "hf_samples_per_s": statistics.median(r["samples_per_s"] for r in runs["hf"]),
                         "vllm_samples_per_s": statistics.median(
                             r["samples_per_s"] for r in runs["vllm"])})
            print(f"{name} N={n}: hf {med['hf']:.0f} tok/s, vllm {med['vllm']:.0f} tok/s, "
                  f"ratio {med['vllm'] / med['hf']:.2f}", flush=True)
        # Random weights seldom end with EOS, and an unfinished sample has no log-prob.
        check = logprob_check(samplers, 8, PROMPTS[name][8], repeats) if name == "tiny" else None
    finally:
        for s in samplers.values():
            s.close()
    return {"startup": startup, "rows": rows, "logprobs": check}


def logprob_check(samplers: dict, n: int, count: int, repeats: int) -> dict:
    """Sampler log-probs (return_logprobs) against a recomputed forward of the same model."""
    import dataclasses

    import torch

    from irpo.modeling import encode_prompt, encode_response
    from irpo.training.data import TokenizedExample
    from irpo.training.logprobs import reference_logprobs

    vl, hf = samplers["vllm"], samplers["hf"]
    texts = prompts(count)
    base, plain, with_lp = vl.cfg, [], []
    for _ in range(repeats):  # alternating, as the throughput runs
        plain.append(measure(vl, texts, n, seed=100)["wall_s"])
        vl.cfg = dataclasses.replace(base, return_logprobs=True)
        try:
            gens, wall = timed(lambda: vl.generate(texts, n, 1.0, MAX_NEW_TOKENS, seed=100))
        finally:
            vl.cfg = base
        with_lp.append(wall)
    tok = hf.tokenizer
    pairs = [(TokenizedExample(encode_prompt(tok, p), encode_response(tok, g.text)), g.logprob)
             for p, gs in zip(texts, gens) for g in gs if g.logprob is not None]
    (ref, _), forward_s = timed(lambda: reference_logprobs(hf.model, [e for e, _ in pairs],
                                                           tok.pad_token_id, 16))
    diff = (torch.tensor([lp for _, lp in pairs], dtype=torch.float64) - ref.double()).abs()
    return {"n": n, "prompts": count, "sequences": count * n, "with_logprob": len(pairs),
            "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "mean_abs_logprob": ref.abs().mean().item(), "sampling_s": statistics.median(plain),
            "sampling_with_logprobs_s": statistics.median(with_lp), "reference_forward_s": forward_s}


def engine_process_startup(path: Path, dtype: str) -> float:
    """vLLM's default layout (engine core and worker in their own processes), for comparison."""
    from irpo.sampling.vllm import VLLMSampler, VLLMSamplerConfig

    sampler, wall = timed(lambda: VLLMSampler(str(path), VLLMSamplerConfig(
        name="vllm", enforce_eager=True, in_process=False), dtype))
    sampler.close()
    return wall


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Sampling throughput: hf vs vllm",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['usable_cpus']} usable CPUs ({m['logical_cpus']} logical), "
        f"{m['mem_gib']} GiB; GPU: {m['gpu'] or 'none'}. torch {m['torch']}, transformers "
        f"{m['transformers']}, vllm {m['vllm']}, Python {m['python']}. OMP_NUM_THREADS="
        f"{m['OMP_NUM_THREADS']} (torch threads {m['torch_threads']}; vLLM's CPU threads unpinned, "
        "same count). Shared with other agents' jobs: 1-minute load average "
        f"{result['load_min']:.1f}-{result['load_max']:.1f} during the runs, so read the ratios.",
        "",
        f"Temperature 1, max_new_tokens {MAX_NEW_TOKENS}, arithmetic test prompts, dtype "
        f"{result['dtype']}; tokens/s = generated tokens (EOS included) / wall time of one "
        f"`generate` call, median of {result['repeats']} alternating repeats. hf: batch_size 64 "
        "prompts per `generate` (the default); vllm: one call with every prompt.",
        "",
        "| model | N | prompts | sequences | hf tokens/s | vllm tokens/s | vllm / hf |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in result["models"].values():
        for r in model["rows"]:
            lines.append(f"| {r['model']} | {r['n']} | {r['prompts']} | {r['prompts'] * r['n']} | "
                         f"{r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | "
                         f"{r['ratio_vllm_over_hf']:.2f} |")
    lines += ["", "Start-up (seconds, once per sampler; the loop starts one per model):", "",
              "| model | hf load | hf first call | vllm engine | vllm first call |",
              "|---|---|---|---|---|"]
    for name, model in result["models"].items():
        s = model["startup"]
        lines.append(f"| {name} | {s['hf']['load_s']:.2f} | {s['hf']['first_call_s']:.2f} | "
                     f"{s['vllm']['engine_s']:.1f} | {s['vllm']['first_call_s']:.2f} |")
    lines += ["", f"`import vllm`: {result['vllm_import_s']:.1f} s once per process. The engine "
              "runs in the caller's process on CPU (in_process); vLLM's default layout, engine "
              "core and worker in their own processes (each importing vLLM again), took "
              f"{result['engine_process_startup_s']:.1f} s to start for M0."
              if result.get("engine_process_startup_s") is not None else ""]
    check = result["models"].get("tiny", {}).get("logprobs")
    if check:
        lines += ["", f"Sampler log-probs (M0, N={check['n']}, {check['sequences']} samples, "
                  f"{check['with_logprob']} with a log-prob): max |vLLM - recomputed forward| "
                  f"{check['max_abs_diff']:.1e} (mean {check['mean_abs_diff']:.1e}; mean |log p| "
                  f"{check['mean_abs_logprob']:.1f}). Sampling took {check['sampling_s']:.2f} s "
                  f"without and {check['sampling_with_logprobs_s']:.2f} s with log-probs (medians); the "
                  f"reference forward they replace took {check['reference_forward_s']:.2f} s (hf, "
                  "batch 16)."]
    models_desc = {"tiny": "the built-in M0 (hidden 128, 4 layers, 4 heads, trained)",
                   "llama-25m": "random-init Llama, hidden 512, 8 layers, 16 heads (head_dim 32), "
                                "intermediate 1408, M0's tokenizer; random weights rarely emit "
                                "EOS, so its samples run to max_new_tokens"}
    lines += ["", "Models: " + "; ".join(f"{k} = {v}" for k, v in models_desc.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sampling"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="a quarter of the prompts, 1 repeat")
    parser.add_argument("--cache", default=str(REPO / "outputs/bench-cache"))
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    os.environ.setdefault("IRPO_CACHE_DIR", str(REPO / "outputs/test-cache"))
    t0 = time.perf_counter()
    _, import_s = timed(lambda: __import__("vllm"))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "vllm_import_s": import_s, "repeats": args.repeats,
              "dtype": args.dtype, "max_new_tokens": MAX_NEW_TOKENS, "quick": args.quick,
              "models": {}}
    for name, path in models(cache).items():
        result["models"][name] = bench_model(name, path, args.repeats, args.dtype, args.quick)
    if not args.quick:
        result["engine_process_startup_s"] = engine_process_startup(models(cache)["tiny"], args.dtype)
    loads = [r["load_1min"] for m in result["models"].values() for row in m["rows"]
             for runs in row["runs"].values() for r in runs]
    result.update(load_min=min(loads), load_max=max(loads), total_s=time.perf_counter() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    print(render(result))
    print(f"total {result['total_s']:.0f} s; wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
