"""Loading any Hugging Face causal LM checkpoint, and the one tokenisation convention.

Every stage (sampler, trainer, evaluation) loads models through
:func:`load_model` and turns text into token ids through
:func:`encode_prompt` / :func:`encode_response`, so a 70B hub checkpoint and the
built-in tiny model go through the same code. Usage::

    model, tok = load_model("outputs/cache/models/tiny-1a2b3c", dtype="float32")
    ids = encode_prompt(tok, example.prompt) + encode_response(tok, example.gold_cot)

The convention: the token ids of a (prompt, response) pair are
``encode_prompt(prompt) + encode_response(response)``. The two halves are
tokenised separately and concatenated, so the prompt/response boundary is
exact (the prompt mask of the losses is just ``len(encode_prompt(...))``) and
the ids the trainer scores start with the very prompt ids the sampler
conditioned on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype from its config spelling ("float32", "bf16", ...); "auto" passes through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)} or 'auto'") from None


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer, with a pad token (falling back to EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token")
        # Padding is always masked out, so reusing EOS is safe; it only needs an id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str | torch.device, key: str = "device") -> torch.device:
    """The torch device a config's ``device`` names: "auto" is the first GPU if there is one, else the CPU.

    ``key`` names the config field in errors (e.g. ``trainer.device``). An explicit GPU
    on a machine without one fails here, not halfway through a stage.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:<index>") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r}: this machine has no CUDA GPU; use {key}=auto or cpu")
    return device


def load_model(path: str | Path, dtype: str = "float32",
               device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of an HF causal LM: a local checkpoint directory or a hub name.

    ``device``: where the weights go (:func:`resolve_device`; "auto" picks the GPU if any).
    A path that looks local (absolute, ./ or an existing parent) but is missing
    gives an error naming it instead of a hub lookup failure.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    # Hub names are "name" or "org/name"; anything else is meant to be a local directory.
    looks_local = p.is_absolute() or str(path).startswith((".", "~")) or len(p.parts) > 2
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"model checkpoint {str(path)!r} is not a directory")
    if looks_local and not p.is_dir():
        raise FileNotFoundError(f"model checkpoint directory {str(path)!r} does not exist")
    path = str(p) if p.exists() else str(path)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise OSError(f"could not load model checkpoint {str(path)!r}: {err}") from err
    model.to(resolve_device(device))
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s (%s, %.1fM parameters)", path, dtype, model.num_parameters() / 1e6)
    return model, tokenizer


def format_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn of the chat template (with the generation prompt), if any."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the formatted prompt, with the tokenizer's special tokens (BOS)."""
    formatted = format_prompt(tokenizer, text)
    # Chat templates usually write the BOS text themselves; adding it again
    # would give a doubled BOS the model never saw in training.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and formatted.startswith(bos))
    return list(tokenizer(formatted, add_special_tokens=add_special)["input_ids"])


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response: no special tokens, EOS appended (the model learns to stop)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses cannot be terminated")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions, if its config states one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the generation config's (may be several) and the tokenizer's."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids
