"""The built-in seed model M0: a small Llama shipped with irpo, or built from its config.

The workplace has no model hub, so the default run starts from a model of its own: a
byte-level BPE tokenizer and a ``LlamaForCausalLM`` (1.1M parameters) pre-trained on the
``pretrain`` split of the arithmetic task (irpo/tasks/arith.py). It is an ordinary Hugging
Face checkpoint directory, so every later stage loads it as it would load a hub model::

    path = ensure_builtin_model(cfg.model, cfg.dataset, cfg.cache_dir)
    model, tok = irpo.modeling.load_model(path)

``model=tiny`` as shipped is a file in the package (``irpo/assets/tiny``): the same model
on every machine, by construction. Its sha256 is checked on every load, and a mismatch
is an error, not a rebuild. A config whose build key (architecture, pre-training settings,
pre-training data) differs from the shipped one's is built on first use
(irpo.builtin_build) into ``<cache_dir>/models/tiny-<hash>``: in a temporary directory
renamed into place under a file lock, so that concurrent runs (a sweep) build it once and
an interrupted build leaves nothing behind. Such a build's bits depend on the CPU and
thread count, so it records and logs its own sha256.

The model is always pre-trained on arithmetic (the dataset config when it is
``arith``, else the default :class:`ArithConfig`), but its tokenizer is
byte-level, so it can tokenize any text, e.g. GSM8K or ARC prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from irpo.builtin_record import describe, read_record, verify
from irpo.config import ModelConfig
from irpo.modeling import encode_prompt, encode_response
from irpo.tasks.arith import ArithConfig

log = logging.getLogger(__name__)

# Bump when a code change alters what gets built, so stale caches are not reused
# (5: plain torch kernels at the caller's thread count; the shipped M0 is a file).
BUILD_VERSION = 5
# The shipped checkpoints, one directory per built-in name (package data).
ASSETS = Path(__file__).resolve().parent / "assets"
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


def ensure_builtin_model(model_cfg: ModelConfig, dataset_cfg: Any, cache_dir: str | Path) -> Path:
    """The checkpoint directory of the built-in model: the shipped one if the config is
    the one it was built from, else a cached build (built now if there is none).

    Logs the checksum and the recorded test accuracy, so two runs can tell at once whether
    they start from the same M0. RuntimeError if the shipped weights do not match their
    record (a damaged install); a damaged cached build is built again.
    """
    if model_cfg.builtin != "tiny":
        raise ValueError(f"model.builtin={model_cfg.builtin!r}: the only built-in model is 'tiny'")
    check_architecture(model_cfg)
    key = json.loads(json.dumps(build_key(model_cfg, pretrain_data_config(dataset_cfg))))  # as recorded
    shipped = shipped_model_dir(model_cfg.builtin)
    record = read_record(shipped)
    if record is not None and record.get("build_key") == key:
        ok, why = verify(shipped)
        if not ok:
            raise RuntimeError(f"the shipped built-in model {shipped} does not match its record ({why}): "
                               "the installation is damaged; reinstall irpo or `git checkout` that folder")
        log.info("using the shipped built-in model %s: %s", shipped, describe(record))
        return shipped
    final = builtin_model_dir(model_cfg, dataset_cfg, cache_dir)
    if (final / "config.json").exists() and _usable(final):
        log.info("using the cached built-in model %s: %s", final, describe(read_record(final)))
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").exists():  # another process built it while we waited?
            if _usable(final):
                log.info("using the built-in model %s: %s", final, describe(read_record(final)))
                return final
            _discard(final)
        log.warning("model.* differs from the shipped %s (%s): building it in %s; its bits depend on "
                    "this machine's CPU and thread count, so its sha256 is its own",
                    model_cfg.builtin, _differences(record, key), final)
        tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(model_cfg, pretrain_data_config(dataset_cfg), tmp)
            os.replace(tmp, final)  # atomic: readers see all of it or nothing
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("using the new built-in model %s: %s", final, describe(read_record(final)))
    return final


def shipped_model_dir(name: str) -> Path:
    return ASSETS / name


def _differences(record: dict[str, Any] | None, key: dict[str, Any]) -> str:
    """Which build-key fields differ from the shipped model's, for the log."""
    if record is None:
        return "no shipped record"
    shipped = record.get("build_key", {})
    diffs = [f"version {shipped.get('version')} -> {key['version']}"] if shipped.get("version") != key["version"] else []
    for part in ("model", "data"):
        for field, value in key[part].items():
            if shipped.get(part, {}).get(field) != value:
                diffs.append(f"{'model' if part == 'model' else 'dataset'}.{field}="
                             f"{value} instead of {shipped.get(part, {}).get(field)}")
    return ", ".join(diffs) or "no field"


def _build(model_cfg: ModelConfig, data_cfg: ArithConfig, out: Path) -> None:
    from irpo.builtin_build import build_here  # it imports this module

    build_here(model_cfg, data_cfg, out)


def _usable(path: Path) -> bool:
    ok, why = verify(path)
    if not ok:
        log.warning("the cached built-in model %s does not match its record (%s): building it again",
                    path, why)
    return ok


def _discard(path: Path) -> None:
    """Move a bad cached model out of the way first, so no reader sees it half removed."""
    trash = path.parent / f"{path.name}.bad-{os.getpid()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
