"""The one-process PyTorch trainer (``trainer=torch``).

One training stage: M(t) starts from M(t-1), which is also the reference.
Reference log-probs are taken from the sampler where it returned them and computed
once up front for the rest (irpo.training.reference); each optimiser step then does
one forward of chosen and rejected responses together (each pair's prompt run
once and no padding: the micro-batch packed into one row, irpo.training.packing), the
method's loss of irpo.losses (its named preference loss + NLL weight, irpo.method), gradient accumulation, clipping, AdamW, and a warm-up
then decay schedule from ``transformers.get_scheduler``. Checkpoints are saved
at evenly spaced steps; the caller picks the best on validation. The model, its
batches and the reference log-probs live on ``trainer.device`` (auto: the GPU if
there is one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from irpo.config import TRAINERS, TrainerConfig
from irpo.losses import preference_loss
from irpo.method import needs_reference, nll_weight
from irpo.modeling import context_length, load_model, resolve_device
from irpo.training.data import tokenize_examples
from irpo.training.hooks import NO_HOOKS, StageHooks
from irpo.training.logprobs import examples_logprobs, reference_logprobs
from irpo.training.reference import stage_reference
from irpo.training.resume import StepSaver, StopOnSignal, discard, load_state, restore, save_state

log = logging.getLogger(__name__)


@TRAINERS.backend("torch", builder="irpo.training.torch_trainer:train")
@dataclass
class TorchTrainerConfig(TrainerConfig):
    """``trainer=torch``: one process (this module's train)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1


MetricsFn = Callable[[dict[str, float], int], None]
# How both trainers lay out a micro-batch (irpo.training.logprobs.LAYOUTS): packed, one row
# without padding. The padded layouts stay selectable for the tests and benchmarks.
LAYOUT = "packed"


def plan_steps(num_examples: int, tcfg) -> int:
    steps = math.ceil(num_examples * tcfg.epochs / tcfg.batch_size)
    if tcfg.max_steps is not None:
        steps = min(steps, tcfg.max_steps) if tcfg.epochs > 0 else tcfg.max_steps
    return max(1, steps)


def checkpoint_steps(total: int, count: int) -> list[int]:
    """``count`` evenly spaced steps ending at ``total`` (deduplicated)."""
    return sorted({max(1, round(total * (i + 1) / count)) for i in range(count)})


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: seeded reshuffle every epoch, no example twice per epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=g).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def micro_loss(model, micro, refs, cfg, pad_id: int, device=None, layout: str | None = None):
    """Forward of one micro-batch (chosen and rejected responses together) and its LossOutput.

    Shared by every backend; the caller runs backward (the torch trainer scales
    the loss itself, DeepSpeed's engine scales by its accumulation steps).
    ``layout`` (default :data:`LAYOUT`, packed): how the micro-batch is laid out for the
    forward (irpo.training.logprobs.examples_logprobs); every layout gives the same loss
    and gradients up to float rounding.
    """
    logps, lengths = examples_logprobs(model, micro, pad_id, device, layout or LAYOUT)
    b = len(micro)
    kwargs = {}
    if needs_reference(cfg):
        kwargs = dict(policy_rejected=logps[b:], ref_chosen=refs[0], ref_rejected=refs[1])
    out = preference_loss(logps[:b], lengths[:b], cfg.beta, nll_weight(cfg),
                          loss=cfg.method.loss, **kwargs)
    return out, logps, b


def set_gradient_checkpointing(model, tcfg) -> None:
    """``trainer.gradient_checkpointing``: recompute each layer's activations in the backward.

    Transformers' non-reentrant checkpointing (its default); it applies in training mode
    only, so the reference log-prob pass runs as before.
    """
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()


def tokenize_for(model, tokenizer, examples: list[dict]):
    """(tokenized examples, truncated responses) under the model's context length."""
    toks, truncated = tokenize_examples(tokenizer, examples, context_length(model) or 1_000_000)
    if truncated:
        log.warning("%d responses were cut to the model's max length", truncated)
    return toks, truncated


def make_optimizer(model, tcfg) -> torch.optim.AdamW:
    """AdamW over every parameter, as one fused kernel (CPU and CUDA; TRL's default too).

    Fused instead of the per-tensor loop that is the default on CPUs: the update of all
    parameters in one call (0.033 -> 0.009 s of a 1.3 s benchmark step, train_step_profile.md).
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=fused)


def warmup_steps(tcfg, steps: int) -> int:
    """Optimiser steps of warm-up in a stage of ``steps``: ``trainer.warmup_ratio`` of them."""
    return int(tcfg.warmup_ratio * steps)


def make_scheduler(optimizer, tcfg, steps: int):
    """Warm-up then ``tcfg.schedule`` decay over ``steps`` optimiser steps."""
    from transformers import get_scheduler  # here: composing a config imports this module

    return get_scheduler(
        "constant_with_warmup" if tcfg.schedule == "constant" else tcfg.schedule, optimizer,
        num_warmup_steps=warmup_steps(tcfg, steps), num_training_steps=steps,
    )


def should_log(step: int, steps: int, tcfg) -> bool:
    return step % tcfg.log_every == 0 or step == steps


def save_checkpoint(model, tokenizer, path: Path, state_dict=None) -> None:
    """A Hugging Face checkpoint directory: config, safetensors weights, tokenizer."""
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def train(cfg, init_path: Path, examples: list[dict], out_dir: Path,
          log_metrics: MetricsFn, step_offset: int, seed: int,
          hooks: StageHooks = NO_HOOKS, layout: str = LAYOUT) -> dict:
    """Train on ``examples``; save checkpoints under ``out_dir/ckpt-<step>``.

    Resumes after the last step checkpoint a killed attempt left in ``out_dir``
    (irpo.training.resume). Returns the stage summary: steps, checkpoint paths, and
    end-of-training log-prob changes of chosen and rejected responses against the reference.
    ``hooks``: callbacks for code that watches the stage (irpo.training.hooks); ``layout``:
    how micro-batches are laid out (irpo.training.logprobs.LAYOUTS; benchmarks compare them).
    """
    tcfg = cfg.trainer
    torch.manual_seed(seed)
    device = resolve_device(getattr(tcfg, "device", "auto"), "trainer.device")
    model, tokenizer = load_model(init_path, cfg.model.dtype, device=device)
    set_gradient_checkpointing(model, tcfg)
    pad_id = tokenizer.pad_token_id
    toks, truncated = tokenize_for(model, tokenizer, examples)
    state = load_state(out_dir)
    refs_all, ref_info = None, {}
    if needs_reference(cfg) and state is not None:  # M(t-1)'s log-probs, saved with the state
        refs_all, ref_info = state["refs"], state["ref_info"]
    elif needs_reference(cfg):
        hooks.reference("start")
        refs_all, ref_info = stage_reference(
            toks, lambda part: reference_logprobs(model, part, pad_id, tcfg.batch_size,
                                                  device=device, layout=layout),
            tcfg, example_ids(examples), seed)
        hooks.reference("end")
    refs_all = tuple(r.to(device) for r in refs_all) if refs_all is not None else None
    model.train()
    steps = plan_steps(len(toks), tcfg)
    save_at = checkpoint_steps(steps, tcfg.checkpoints)
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, steps)
    history: list[dict[str, float]] = []
    checkpoints: list[Path] = []
    done = 0
    if state is not None:
        restore(state, model, optimizer, scheduler)
        history, done = state["history"], state["step"]
        checkpoints = [out_dir / name for name in state["checkpoints"]]
    saver = StepSaver(tcfg.save_every_steps, tcfg.save_every_min)
    batches = batch_order(len(toks), steps, tcfg.batch_size, seed)
    bar = tqdm(batches[done:], initial=done, total=steps, desc="training", unit="step")
    with StopOnSignal() as stop:
        for step, idx in enumerate(bar, done + 1):
            _step(model, optimizer, scheduler, toks, refs_all, idx, cfg, pad_id, device,
                  history, bar, layout)
            if should_log(step, steps, tcfg):
                log_metrics(history[-1], step_offset + step)
            hooks.step(step, history[-1])
            if step in save_at:
                checkpoints.append(out_dir / f"ckpt-{step}")
                save_checkpoint(model, tokenizer, checkpoints[-1])
            if saver.due(step, steps) or stop.received:
                save_state(out_dir, step, model, optimizer, scheduler, history, checkpoints,
                           refs_all, ref_info)
                saver.saved()
            if stop.received:
                stop.act()
    discard(out_dir)
    return stage_summary(steps, len(toks), truncated, checkpoints, history, ref_info)


def _step(model, optimizer, scheduler, toks, refs_all, idx, cfg, pad_id, device,
          history: list[dict], bar, layout: str) -> None:
    """One optimiser step on the batch ``idx``; its metrics are appended to ``history``."""
    tcfg = cfg.trainer
    micro_size = tcfg.batch_size // tcfg.grad_accum
    parts = [idx[i : i + micro_size] for i in range(0, len(idx), micro_size)]
    sums: dict[str, float] = {}
    for part in parts:
        refs = (refs_all[0][part], refs_all[1][part]) if refs_all else None
        out, logps, b = micro_loss(model, [toks[i] for i in part], refs, cfg, pad_id, device=device,
                                   layout=layout)
        (out.loss * (len(part) / len(idx))).backward()
        accumulate_metrics(sums, out, logps, b, refs, len(part) / len(idx))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {**sums, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]}
    history.append(metrics)
    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")


def example_ids(examples: list[dict]) -> list[str]:
    """Each example's ``id`` (its prompt's), for messages that name an example."""
    return [str(e.get("id")) for e in examples]


def stage_summary(steps: int, examples: int, truncated: int, checkpoints: list[Path],
                  history: list[dict[str, float]], ref_info: dict | None = None) -> dict:
    """What every trainer backend returns to the driver's train stage.

    ``ref_info``: where the reference log-probs came from (irpo.training.reference).
    """
    return {"steps": steps, "examples": examples, "truncated_responses": truncated,
            "checkpoints": [p.name for p in checkpoints], **(ref_info or {}),
            **_end_summary(history)}


def accumulate_metrics(sums: dict, out, logps, b: int, refs, weight: float) -> None:
    """Add one micro-batch's metrics, weighted by its share of the step's batch, to ``sums``."""
    values = {
        "train/loss": out.loss, "train/dpo": out.dpo, "train/nll": out.nll,
        "logps/chosen": logps[:b].mean(),
    }
    if refs is not None:
        values.update({
            "logps/rejected": logps[b:].mean(),
            "logps/chosen_delta": (logps[:b] - refs[0]).mean(),
            "logps/rejected_delta": (logps[b:] - refs[1]).mean(),
            "rewards/accuracy": out.reward_accuracy, "rewards/margin": out.reward_margin,
        })
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach()) * weight


def _end_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """Means over the last 10% of steps (at least one): what training ended at."""
    tail = history[-max(1, len(history) // 10):]
    keys = ["train/loss", "logps/chosen_delta", "logps/rejected_delta", "rewards/accuracy"]
    return {k.split("/")[1] + "_end": sum(h[k] for h in tail) / len(tail)
            for k in keys if k in tail[0]}
