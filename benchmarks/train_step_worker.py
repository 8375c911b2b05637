"""One side of the training-step benchmark, in its own process so its peak RSS is its own.

    python benchmarks/train_step_worker.py --side ours|ours_refpass|ours_padded|trl|trl_pre|trl_default \\
        --workdir DIR --out result.json [--alpha 4 --lr 1e-4 --batch-size 16]

Trains one epoch over ``DIR/pairs.jsonl`` starting from ``DIR/model`` (see bench_inputs.py)
and writes the timings to ``--out``. Sides:

* ``ours``: ``irpo.training.torch_trainer.train``, what the driver's train stage calls: the
  sampler's reference log-probs where the pairs carry them (the variable-length workload; only
  ``trainer.ref_check_pairs`` = 8 pairs are scored again), else one reference pass over the
  pairs, then one packed forward per step;
* ``ours_refpass``: the same with the pairs' reference log-probs dropped (a reference pass);
* ``ours_padded``: ``ours_refpass`` with the padded shared-prefix layout the trainer used
  before packing (``train(..., layout="shared_prefix")``): today's trainer before this change;
* ``trl``: TRL's ``DPOTrainer`` with ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, alpha]``
  and a reference model forward every step;
* ``trl_pre``: the same with ``precompute_ref_log_probs=True`` (one pass before training);
* ``trl_default``: ``trl`` with TRL's default gradient checkpointing left on.

Every side runs on the same device (the GPU if there is one, else the CPU), fp32, the same
batch size, learning rate, linear schedule with 10% warm-up, AdamW (weight decay 0),
clipping at 1, dropout off, a metrics log every step and one save at the end. Step times are
the intervals between consecutive end-of-step callbacks (ours: the trainer's ``on_step`` hook,
irpo.training.hooks, right after its per-step metrics log; the reference pass is timed by its
``on_reference`` hook), so each includes one optimiser step and one metrics log; on a GPU each
mark waits for the queued kernels (``torch.cuda.synchronize``). The warm-up is the trainer's
own rule (``torch_trainer.warmup_steps``), given to TRL as a step count.
:func:`first_step_loss` runs one step of a side in-process (for the loss agreement check).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SIDES = ("ours", "ours_refpass", "ours_padded", "trl", "trl_pre", "trl_default")
OURS = ("ours", "ours_refpass", "ours_padded")
REF_KEYS = ("chosen_ref_logprob", "rejected_ref_logprob")

from measure import clocks, peak_gpu_mib, peak_rss_mib  # benchmarks/ is on the path now


def run_ours(model_dir: Path, pairs: list[dict], args, out_dir: Path, side: str = "ours") -> dict:
    from bench_inputs import rpo_config

    from irpo.training.hooks import StageHooks
    from irpo.training.torch_trainer import train

    cfg = rpo_config(model_dir, args, beta=args.beta)
    if side != "ours":  # no sampler reference log-probs: a reference pass
        pairs = [{k: v for k, v in p.items() if k not in REF_KEYS} for p in pairs]
    marks: dict = {"step_end": [], "losses": []}

    def on_reference(phase: str) -> None:  # "start", "end": the trainer's own pass
        marks[f"ref_{phase}"] = clocks()

    def on_step(step: int, metrics: dict) -> None:
        marks["step_end"].append(clocks())
        marks["losses"].append(metrics["train/loss"])

    t0 = clocks()
    train(cfg, model_dir, pairs, out_dir, lambda metrics, step: None, 0, args.seed,
          hooks=StageHooks(on_reference=on_reference, on_step=on_step),
          layout="shared_prefix" if side == "ours_padded" else "packed")
    t_end = clocks()
    if "ref_end" in marks:
        marks["ref"] = [end - start for start, end in zip(marks.pop("ref_start"), marks["ref_end"])]
    return {"t0": t0, "t_end": t_end, "first_step_start": marks.pop("ref_end", t0), **marks}


def trl_config(side: str, args, steps: int, out_dir: Path, **extra):
    import torch
    from bench_inputs import rpo_config
    from trl import DPOConfig

    from irpo.training.torch_trainer import warmup_steps

    ours = rpo_config(out_dir, args, beta=args.beta).trainer  # the same schedule as ours

    return DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr,
        lr_scheduler_type=ours.schedule, warmup_steps=warmup_steps(ours, steps), weight_decay=0.0,
        max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, args.alpha],
        precompute_ref_log_probs=side == "trl_pre",
        gradient_checkpointing=side == "trl_default",  # TRL's default is True; ours never does it
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), max_length=None, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        model_init_kwargs={"dtype": "float32"}, **extra)


def make_trl_trainer(side: str, model_dir: Path, pairs: list[dict], args, out_dir: Path, callbacks=()):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    marks: dict = {}

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer unchanged except that its precompute pass is timed."""

        def _precompute_ref_logps(self, *a, **kw):
            t = clocks()
            result = super()._precompute_ref_logps(*a, **kw)
            end = clocks()
            marks["ref"] = [end[0] - t[0], end[1] - t[1]]
            return result

    steps = -(-len(pairs) // args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = TimedDPOTrainer(model=str(model_dir), args=trl_config(side, args, steps, out_dir),
                              train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))
    return trainer, marks


def run_trl(side: str, model_dir: Path, pairs: list[dict], args, out_dir: Path) -> dict:
    from transformers import TrainerCallback

    timeline: dict = {"step_end": [], "losses": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timeline.setdefault("first_step_start", clocks())

        def on_step_end(self, a, state, control, **kw):
            timeline["step_end"].append(clocks())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                timeline["losses"].append(logs["loss"])

    t0 = clocks()
    trainer, marks = make_trl_trainer(side, model_dir, pairs, args, out_dir, [Timer()])
    trainer.train()
    trainer.save_model(str(out_dir / "final"))  # ours saves its one checkpoint too
    return {"t0": t0, "t_end": clocks(), **marks, **timeline}


def summarise(side: str, raw: dict, n_pairs: int, batch_size: int, rss_import: float) -> dict:
    out = {"side": side, "pairs": n_pairs, "steps": len(raw["step_end"]), "batch_size": batch_size,
           "losses": raw["losses"], "rss_after_import_mib": rss_import, "peak_rss_mib": peak_rss_mib(),
           "peak_gpu_mib": peak_gpu_mib()}
    for i, clock in enumerate(("wall", "cpu")):
        ends = [m[i] for m in raw["step_end"]]
        ref = raw["ref"][i] if "ref" in raw else 0.0
        out[clock] = {
            # everything before the first step but the reference pass: load, tokenise, build
            "setup_s": raw["first_step_start"][i] - raw["t0"][i] - ref,
            "ref_s": ref,
            "step_s": [ends[0] - raw["first_step_start"][i]] + [b - a for a, b in itertools.pairwise(ends)],
            "after_steps_s": raw["t_end"][i] - ends[-1],  # the final save
            "stage_s": raw["t_end"][i] - raw["t0"][i],
        }
    return out


def first_step_loss(side: str, model_dir: Path, pairs: list[dict], alpha: float, beta: float = 0.1,
                    lr: float = 1e-4, seed: int = 0) -> float:
    """The loss of the first (only) step on ``pairs`` as one batch: both sides see the same batch."""
    args = argparse.Namespace(alpha=alpha, beta=beta, lr=lr, batch_size=len(pairs), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        if side in OURS:
            raw = run_ours(model_dir, pairs, args, Path(tmp), side)
        else:
            raw = run_trl(side, model_dir, pairs, args, Path(tmp))
    if len(raw["losses"]) != 1:
        raise AssertionError(f"{side}: expected one logged step, got {raw['losses']}")
    return float(raw["losses"][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=SIDES, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="irpo-bench-")
    os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "datasets")  # no reuse between runs
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.side in OURS:
        import irpo.training.torch_trainer  # noqa: F401  (import cost outside the timings)
    else:
        import trl  # noqa: F401
    from bench_inputs import read_pairs

    pairs = read_pairs(args.workdir / "pairs.jsonl")
    rss_import = peak_rss_mib()
    try:
        if args.side in OURS:
            raw = run_ours(args.workdir / "model", pairs, args, Path(tmp), args.side)
        else:
            raw = run_trl(args.side, args.workdir / "model", pairs, args, Path(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = summarise(args.side, raw, len(pairs), args.batch_size, rss_import)
    result["threads"] = torch.get_num_threads()
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
