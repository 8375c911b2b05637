"""What resuming inside a stage costs, and what a stop loses: ``python benchmarks/resume_cost.py``.

Writes benchmarks/results/resume_cost.{json,md}. Three measurements, side by side in one run:

1. **Step checkpoints** (irpo.training.resume): the torch trainer's train stage on the
   training-step benchmark's model (10M parameters, benchmarks/bench_inputs.py) without
   step checkpoints and with one after every step, alternated; the difference per save is
   the cost of one checkpoint, and that over the default interval (``trainer.save_every_min``)
   is the fraction of training time the default costs.
2. **Chunk commits** (irpo.chunks): the built-in model M0 evaluates test prompts in chunks;
   the time outside the generation (writing and renaming each chunk file) over the total.
3. **Work lost per stop**: the train stage is stopped after a random step, as a kill would
   stop it, and rerun: how many steps the rerun trains again (at most the checkpoint
   interval minus one); and stopped by SIGUSR2, SLURM's time-limit warning (none).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import build_inputs, rpo_config
from measure import cpu_name, load

from irpo.training.torch_trainer import train

RESULTS = Path(__file__).resolve().parent / "results"


class Stop(Exception):
    pass


def train_stage(cfg, inputs, out: Path, stop_at: int | None = None) -> tuple[float, list[int]]:
    """(wall seconds, logged steps) of one train stage; ``stop_at``: stop after that step."""
    steps: list[int] = []

    def log(metrics, step):
        steps.append(step)
        if step == stop_at:
            raise Stop

    start = time.perf_counter()
    try:
        train(cfg, inputs.model_dir, inputs.pairs, out, log, 0, 0)
    except Stop:
        pass
    return time.perf_counter() - start, steps


def checkpoint_cost(inputs, args, work: Path) -> dict:
    base = rpo_config(inputs.model_dir, args, 0.1, save_every_min=None, device="cpu")
    every = replace(base, trainer=replace(base.trainer, save_every_steps=1))
    times: dict[str, list[float]] = {"none": [], "every_step": []}
    steps = 0
    for r in range(args.repeats):
        for name, cfg in (("none", base), ("every_step", every)):
            wall, logged = train_stage(cfg, inputs, work / f"ckpt-{name}-{r}")
            times[name].append(wall)
            steps = len(logged)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    per_save = (med["every_step"] - med["none"]) / max(steps - 1, 1)  # no save after the last step
    interval = base.trainer.save_every_min or 30.0
    return {"stage_steps": steps, "stage_s": times, "median_stage_s": med,
            "per_checkpoint_s": per_save, "step_s": med["none"] / steps,
            "default_interval_min": interval,
            "fraction_at_default_interval": per_save / (interval * 60)}


def chunk_cost(args) -> dict:
    from hydra import compose, initialize_config_dir

    from irpo.builtin_model import ensure_builtin_model
    from irpo.chunks import run_chunks
    from irpo.config import register_configs, to_config
    from irpo.evaluate import _evaluate_chunk
    from irpo.sampling.hf import HFSampler
    from irpo.tasks import build_task

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):  # the default run's config
        cfg = to_config(compose("config", [f"dataset.test_size={args.eval_prompts}"]))
    model = ensure_builtin_model(cfg.model, cfg.dataset, Path(cfg.cache_dir))  # M0, cached
    task = build_task(cfg.dataset)
    examples = task.load_split("test")
    data = cfg.dataset
    sampler = HFSampler(str(model), cfg.sampler)
    inside = 0.0

    def fn(first, part):
        nonlocal inside
        start = time.perf_counter()
        out = _evaluate_chunk(task, sampler, part, first, data.max_new_tokens, 0, 0.0, 0, "test")
        inside += time.perf_counter() - start
        return out

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_chunks(Path(tmp), examples, args.chunk_size, fn, "bench/eval")
        total = time.perf_counter() - start
    sampler.close()
    return {"prompts": len(examples), "chunk_size": args.chunk_size, "total_s": total,
            "generation_s": inside, "commit_fraction": (total - inside) / total}


def work_lost(inputs, args, work: Path) -> dict:
    rng = random.Random(0)
    cfg = rpo_config(inputs.model_dir, args, 0.1, save_every_min=None, save_every_steps=args.every,
                     device="cpu")
    redone = []
    for k in range(args.stops):
        out = work / f"lost-{k}"
        _, first = train_stage(cfg, inputs, out)
        total = len(first)
        stop_at = rng.randrange(1, total)
        shutil_rm(out)
        train_stage(cfg, inputs, out, stop_at=stop_at)
        _, again = train_stage(cfg, inputs, out)
        redone.append({"stopped_after": stop_at, "rerun_starts_at": again[0],
                       "steps_trained_again": stop_at - again[0] + 1})
    # SIGUSR2 (SLURM's warning) after step 3: the step finishes and is saved, nothing is redone.
    out = work / "signal"
    handler = signal.signal(signal.SIGUSR2, lambda s, f: (_ for _ in ()).throw(Stop()))
    try:
        sig_cfg = replace(cfg, trainer=replace(cfg.trainer, save_every_steps=None))

        def log(metrics, step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGUSR2)

        try:
            train(sig_cfg, inputs.model_dir, inputs.pairs, out, log, 0, 0)
        except Stop:
            pass
    finally:
        signal.signal(signal.SIGUSR2, handler)
    _, again = train_stage(sig_cfg, inputs, out)
    return {"save_every_steps": args.every, "kills": redone,
            "max_steps_trained_again": max(r["steps_trained_again"] for r in redone),
            "sigusr2_after_step_3_rerun_starts_at": again[0]}


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def render(res: dict) -> str:
    c, k, w = res["checkpoints"], res["chunks"], res["work_lost"]
    return "\n".join([
        "# Resuming inside a stage: cost and work lost", "",
        f"`python benchmarks/resume_cost.py` on {res['machine']['cpu']}, {res['machine']['threads']} "
        f"torch thread(s), load before the run {res['machine']['load_before']}.", "",
        "| what | measured |", "|---|---|",
        f"| one step checkpoint, {res['model_parameters'] / 1e6:.1f}M-parameter model (weights + AdamW) | "
        f"{c['per_checkpoint_s']:.3f} s (step {c['step_s']:.2f} s; stage medians "
        f"{c['median_stage_s']['none']:.1f} s without, {c['median_stage_s']['every_step']:.1f} s "
        f"with one after every step) |",
        f"| its share of training at the default interval ({c['default_interval_min']:g} min) | "
        f"{100 * c['fraction_at_default_interval']:.4f}% (goal <= 3%) |",
        f"| chunk commits, M0 greedy eval of {k['prompts']} prompts in chunks of {k['chunk_size']} | "
        f"{100 * k['commit_fraction']:.2f}% of {k['total_s']:.1f} s |",
        f"| steps trained again after a kill, checkpoint every {w['save_every_steps']} steps | at most "
        f"{w['max_steps_trained_again']} over {len(w['kills'])} random kills (bound: "
        f"{w['save_every_steps']}) |",
        f"| ... after SIGUSR2 at step 3 (no periodic checkpoint) | the rerun starts at step "
        f"{w['sigusr2_after_step_3_rerun_starts_at']}: nothing trained again |", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=int, default=3, help="save_every_steps of the kill trials")
    p.add_argument("--stops", type=int, default=3)
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_name(), "threads": args.threads, "load_before": round(load()[0], 2),
               "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp), args.pairs)
        res = {"machine": machine, "args": vars(args), "model_parameters": inputs.num_parameters,
               "checkpoints": checkpoint_cost(inputs, args, Path(tmp)),
               "work_lost": work_lost(inputs, args, Path(tmp))}
    res["chunks"] = chunk_cost(args)
    res["machine"]["load_after"] = round(load()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume_cost.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "resume_cost.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
