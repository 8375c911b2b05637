"""The built-in model's record: what M0 is, checked wherever it is loaded.

``irpo_builtin.json`` lies beside the weights of every built-in checkpoint (the one shipped
in ``irpo/assets`` and any built into the cache): the build key, the sha256 of the weight
tensors, M0's greedy test accuracy, and how and where it was built. irpo.builtin_model
checks it on load, irpo.builtin_build writes it, and a run directory pins the sha256 of
the M0 it started from (``m0.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from irpo.rundir import write_json_atomic

RECORD = "irpo_builtin.json"


def weights_checksum(model_dir: str | Path) -> str:
    """sha256 over every weight tensor (name, dtype, shape, bytes), in name order.

    Over the tensors, not the file, so that the checksum names the model and not the
    way a library version lays out the safetensors header.
    """
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()


def read_record(model_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def verify(model_dir: str | Path) -> tuple[bool, str]:
    """(whether the weights match the recorded checksum, a reason when they do not)."""
    record = read_record(model_dir)
    if record is None or "sha256" not in record:
        return False, f"no readable {RECORD} with a sha256"
    try:
        actual = weights_checksum(model_dir)
    except Exception as err:  # a truncated or garbled safetensors file
        return False, f"weights unreadable ({type(err).__name__}: {err})"
    if actual != record["sha256"]:
        return False, f"weights sha256 {actual[:12]} != recorded {record['sha256'][:12]}"
    return True, ""


def describe(record: dict[str, Any] | None) -> str:
    """One line for the log: the checksum and the recorded accuracy."""
    if record is None or "sha256" not in record:
        return f"no {RECORD} record"
    acc, n = record.get("test_accuracy"), record.get("eval_size")
    where = f"greedy test accuracy {acc:.1%} on the first {n} arith test problems" if acc is not None \
        else "test accuracy not measured (model.pretrain_eval_size=0)"
    return f"sha256 {record['sha256'][:16]}, {where}"


# The M0 a run directory started from, written before its first stage. The directory's
# name hashes the config, not the weights: a new shipped M0 keeps the config and its run
# directory, and resuming there would mix two models' results.
RUN_PIN = "m0.json"


def pin_run_to_model(run_dir: Path, model_dir: Path) -> None:
    """Record the built-in M0 a run starts from; refuse a run directory of another M0.

    A model without a record (``model.path``: an outside checkpoint) is not pinned. A run
    directory with finished stages but no pin was started before runs recorded their M0,
    so which M0 it used cannot be told: refused too. ValueError, naming what to do.
    """
    record = read_record(model_dir)
    if record is None or "sha256" not in record:
        return
    pin = Path(run_dir) / RUN_PIN
    if pin.exists():
        started = json.loads(pin.read_text())["sha256"]
        if started != record["sha256"]:
            raise ValueError(
                f"{run_dir} was started from the built-in model with sha256 {started[:16]}, but this "
                f"irpo's M0 is sha256 {record['sha256'][:16]}; resuming would mix two models' "
                "results: move that run directory away or set another output_root")
        return
    if any(Path(run_dir).glob("iter*/*/DONE")):
        raise ValueError(
            f"{run_dir} has finished stages but no {RUN_PIN}: it was started by an older irpo "
            "whose built-in model may differ from this one; move that run directory away or "
            "set another output_root")
    write_json_atomic(pin, {"sha256": record["sha256"], "test_accuracy": record.get("test_accuracy")})
