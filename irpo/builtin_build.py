"""Building a built-in model from its config: what it depends on (its build key), its
tokenizer and architecture, pre-training, saving, measuring and recording.

irpo.builtin_model calls :func:`build_here` on first use of a ``model.*`` config that is
not the shipped one. The same function made the shipped M0, with one command::

    python -m irpo.builtin_build --out irpo/assets/tiny            # the shipped M0's config
    python -m irpo.builtin_build model.pretrain_steps=400          # into the cache, as a run would

The options after ``--out`` are Hydra overrides of the run config (``model.*`` and, with
``dataset=arith``, the arithmetic task's fields); without ``--out`` the model goes where a
run with those overrides looks for it. The build uses torch's kernels at the process's
thread count, so its bits may differ between CPUs and thread counts: it records its own
sha256 and says so.

The record ``irpo_builtin.json`` (irpo.builtin_record) beside the weights holds the build
key, the sha256 of the weight tensors, M0's greedy accuracy on the first
``model.pretrain_eval_size`` test problems of the arithmetic task (measured as the run's
iteration-0 evaluation measures it: ``sampler=hf``, greedy), and the machine it was built on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from irpo.builtin_record import RECORD, describe, weights_checksum
from irpo.config import ModelConfig
from irpo.modeling import encode_prompt, encode_response
from irpo.rundir import write_json_atomic
from irpo.tasks.arith import ArithConfig

EVAL_MAX_NEW_TOKENS = 96  # conf/dataset/arith.yaml's max_new_tokens
EVAL_BATCH_SIZE = 64  # conf/sampler/hf.yaml's batch_size (greedy_batch_size: its default)

log = logging.getLogger(__name__)

# Bump when a code change alters what gets built, so stale caches are not reused
# (5: plain torch kernels at the caller's thread count; the shipped M0 is a file).
BUILD_VERSION = 5
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# What the built model depends on. A whitelist, so that fields about how it is
# loaded or later trained (dtype, the iterations' lr) never trigger a rebuild.
_MODEL_FIELDS_HASHED = (
    "builtin", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
    "max_position_embeddings", "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "pretrain_seed",
    "pretrain_eval_size",
)
_DATA_FIELDS_HASHED = (
    "data_seed", "pretrain_size", "min_ops", "max_ops", "max_operand", "max_value", "prompt_template",
)


def _as_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # a DictConfig


def pretrain_data_config(dataset_cfg: Any) -> ArithConfig:
    """The arithmetic config whose ``pretrain`` split M0 learns from."""
    if dataset_cfg is not None and getattr(dataset_cfg, "name", None) == "arith":
        values = {k: v for k, v in _as_dict(dataset_cfg).items() if k in _DATA_FIELDS_HASHED}
        base = ArithConfig(**values)
    else:
        base = ArithConfig()
    # The pre-training split does not depend on the other sizes (see arith.py);
    # zero them so the task can be built from any config.
    return dataclasses.replace(base, train_size=0, valid_size=0, test_size=0)


def build_key(model_cfg: Any, data_cfg: ArithConfig) -> dict[str, Any]:
    """Everything the built model depends on (hashed into its directory name)."""
    model = {k: v for k, v in _as_dict(model_cfg).items() if k in _MODEL_FIELDS_HASHED}
    data = {k: getattr(data_cfg, k) for k in _DATA_FIELDS_HASHED}
    return {"version": BUILD_VERSION, "model": model, "data": data}


def builtin_model_dir(model_cfg: Any, dataset_cfg: Any, cache_dir: str | Path) -> Path:
    key = build_key(model_cfg, pretrain_data_config(dataset_cfg))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{model_cfg.builtin}-{digest}"


def build_here(model_cfg: Any, data_cfg: Any, out: Path, command: str | None = None) -> dict[str, Any]:
    """Pre-train M0, save it to ``out`` (which must not exist), measure it and write its
    record; returns the record."""
    from irpo.tasks.arith import ArithTask

    start = time.perf_counter()
    log.info("building the built-in model in %s (%d threads)", out, torch.get_num_threads())
    examples = ArithTask(data_cfg).load_split("pretrain")
    tokenizer = build_tokenizer([e.prompt + (e.gold_cot or "") for e in examples], model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer)
    log.info("pre-training %.2fM parameters for %d steps on %d examples",
             model.num_parameters() / 1e6, model_cfg.pretrain_steps, len(examples))
    losses = pretrain(model, tokenizer, [(e.prompt, e.gold_cot or "") for e in examples], model_cfg)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    pretrain_s = time.perf_counter() - start
    record = {
        "build_key": build_key(model_cfg, data_cfg),
        "sha256": weights_checksum(out),
        "test_accuracy": measure_accuracy(out, data_cfg, model_cfg.pretrain_eval_size),
        "eval_size": model_cfg.pretrain_eval_size,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
        "pretrain_seconds": round(pretrain_s, 1),
        "built": {"command": command or "irpo.builtin_model.ensure_builtin_model (first use)",
                  "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                  "cpu": cpu_name(), "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "torch": torch.__version__, "python": platform.python_version()},
    }
    write_json_atomic(out / RECORD, record)
    log.info("built-in model done in %.0f s (final loss %.3f): %s; built with this machine's kernels, "
             "so its bits may differ from another machine's build of the same config",
             record["seconds"], record["final_loss"] or 0, describe(record))
    return record


def measure_accuracy(model_dir: Path, data_cfg: Any, size: int) -> float | None:
    """Greedy accuracy on the first ``size`` test problems, as the run's iteration 0 measures it."""
    if size <= 0:
        return None
    from irpo.evaluate import evaluate
    from irpo.sampling.hf import HFSampler, HFSamplerConfig
    from irpo.tasks.arith import ArithTask

    task = ArithTask(dataclasses.replace(data_cfg, test_size=size))
    sampler = HFSampler(str(model_dir), HFSamplerConfig(name="hf", batch_size=EVAL_BATCH_SIZE, device="cpu"))
    try:
        metrics = evaluate(task, sampler, task.load_split("test"), max_new_tokens=EVAL_MAX_NEW_TOKENS,
                           maj_k=0, maj_temperature=0.0, seed=0, prefix="M0 test")
    finally:
        sampler.close()
    return metrics["M0 test/accuracy"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_architecture(model_cfg: ModelConfig) -> None:
    if model_cfg.pretrain_eval_size < 0:
        raise ValueError(f"model.pretrain_eval_size={model_cfg.pretrain_eval_size} must be >= 0 "
                         "(0: do not measure M0's test accuracy)")
    hidden, heads = model_cfg.hidden_size, model_cfg.num_heads
    if heads < 1 or hidden % heads != 0:
        raise ValueError(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")
    if hidden // heads < 32:
        # vLLM's attention kernels need head_dim >= 32; keep M0 servable by every backend.
        raise ValueError(
            f"model: head_dim = hidden_size / num_heads = {hidden}/{heads} = {hidden // heads} "
            "must be >= 32 (lower num_heads or raise hidden_size)"
        )


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with single-digit tokens.

    Byte level: any text encodes without unknown tokens. Single digits: numbers
    are spelled digit by digit, so the model can learn column arithmetic
    instead of memorising a token per number.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
        model_max_length=1_000_000,
    )


def build_model(model_cfg: ModelConfig, tokenizer: Any) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    check_architecture(model_cfg)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(model_cfg.pretrain_seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs with labels on every real token (padding -100)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = labels[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _length_grouped_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of index batches whose members have similar lengths.

    Random batches pad to their longest member and waste about a third of the
    compute here; sorting within windows of 32 batches removes most of that
    while the order of batches stays random.
    """
    window = 32 * batch_size
    while True:
        order = torch.randperm(len(lengths), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], model_cfg: ModelConfig,
             progress: bool = True) -> list[float]:
    """Train ``model`` in place on (prompt, response) pairs; returns the loss of every step.

    The loss is on all tokens, prompt included, although later stages mask
    the prompt: measured here, with the same steps the model copied the right
    operation and operand into its chain of thought 89% of the time instead of
    29% with a response-only loss (learning to predict the story teaches it
    to read the story), for more than 10 points of accuracy.
    """
    seqs = [(encode_prompt(tokenizer, p), encode_response(tokenizer, r)) for p, r in pairs]
    longest = max(len(p) + len(r) for p, r in seqs)
    if longest > model_cfg.max_position_embeddings:
        raise ValueError(f"a pre-training example has {longest} tokens, more than "
                         f"model.max_position_embeddings={model_cfg.max_position_embeddings}")
    steps, batch_size = model_cfg.pretrain_steps, model_cfg.pretrain_batch_size
    batches = _length_grouped_batches([len(p) + len(r) for p, r in seqs], batch_size,
                                      torch.Generator().manual_seed(model_cfg.pretrain_seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=model_cfg.pretrain_lr,
                                  betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pre-training M0", disable=not progress, mininterval=1.0)
    for _ in bar:
        loss = model(**_batch([seqs[i] for i in next(batches)], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m irpo.builtin_build",
        description="Build the built-in model of a run config (model=tiny, with overrides).")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the checkpoint (replaced if it exists); "
                             "default: the cache directory a run with these overrides uses")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.pretrain_steps=400")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from irpo.config import compose, to_config

    cfg = to_config(compose(["model=tiny", *args.overrides]))
    check_architecture(cfg.model)
    out = args.out or builtin_model_dir(cfg.model, cfg.dataset, cfg.cache_dir)
    tmp = out.parent / f"{out.name}.tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    command = " ".join(["python -m irpo.builtin_build", *(["--out", str(args.out)] if args.out else []),
                        *args.overrides])
    try:
        record = build_here(cfg.model, pretrain_data_config(cfg.dataset), tmp, command=command)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{out}: {describe(record)}", file=sys.stderr)


if __name__ == "__main__":
    main()
