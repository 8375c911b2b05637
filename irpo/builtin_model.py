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

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from irpo.builtin_build import (  # noqa: F401  (re-exported: what a build key and a build are)
    BUILD_VERSION,
    build_here,
    build_key,
    build_model,
    build_tokenizer,
    builtin_model_dir,
    check_architecture,
    lr_factor,
    pretrain,
    pretrain_data_config,
)
from irpo.builtin_record import describe, read_record, verify
from irpo.config import ModelConfig
from irpo.tasks.arith import ArithConfig

log = logging.getLogger(__name__)

# The shipped checkpoints, one directory per built-in name (package data).
ASSETS = Path(__file__).resolve().parent / "assets"


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
