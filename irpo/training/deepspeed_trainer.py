"""The DeepSpeed ZeRO-2/3 trainer (``trainer=deepspeed``): one training stage over many processes.

Same arguments and stage summary as irpo.training.torch_trainer.train, and the
same loss, batches, schedule, clipping, accumulation and checkpoint steps (the
torch trainer's helpers are reused), so ``trainer=torch`` and
``trainer=deepspeed`` give the same loss curve up to float reduction order.

Two halves:

* :func:`train` runs in the driver. It writes the stage's inputs to
  ``<stage dir>/deepspeed/request.pkl`` and starts the workers with
  irpo.launch.stage_command: ``torchrun --standalone`` locally, ``srun ...
  torchrun`` over every node inside a SLURM allocation (``trainer.num_processes``
  per node; the stage directory must be on a filesystem every node sees). It
  logs each step's metrics to the tracker while the workers run, as the torch
  trainer does, and returns the summary the workers wrote.
* :func:`worker` runs in each torchrun process::

      python -m torch.distributed.run --standalone --nproc-per-node=2 \\
          -m irpo.training.deepspeed_trainer <stage dir>/deepspeed

  It loads M(t-1) (under ZeRO-3 straight into partitions: transformers'
  HfDeepSpeedConfig makes from_pretrained build it under deepspeed.zero.Init
  and fill it one checkpoint file and one layer at a time, so no process holds
  a full copy of the weights), wraps it in a DeepSpeed engine with a plain ``torch.optim.AdamW`` (DeepSpeed's
  own optimizers compile C++ ops) and computes the reference log-probs the
  sampler did not give (irpo.training.reference) with that engine before the
  first update: M(t-1) is the reference, so no second model is loaded. Each
  rank scores its shard; the shards are all-gathered.
  Every step's batch (the torch trainer's batch order) is split evenly over
  the ranks; DeepSpeed averages gradients across ranks and accumulation steps,
  which is the torch trainer's batch mean. A rank's micro-batch is packed into one
  row without padding, each pair's prompt once (irpo.training.packing), so it is one
  forward call: under ZeRO-3 one gathering of the parameters, as before. Checkpoints are full Hugging Face
  directories: under ZeRO-3 the weights are gathered one layer at a time
  (``stage3_gather_16bit_weights_on_model_save``) in the model's own dtype,
  float32 included, so the next stage loads what was trained.

``model.dtype`` bf16/fp16 turns on DeepSpeed's mixed precision (fp32 master
weights, unlike the torch trainer, which updates the model's own dtype); fp16
adds dynamic loss scaling, which skips steps that overflow.

Backend ``auto``: NCCL on GPUs, gloo on CPUs. On CPUs DeepSpeed compiles a
shared-memory op on first use (about a minute; g++ and ninja), cached in
``$TORCH_EXTENSIONS_DIR`` (default ``<cache_dir>/torch_extensions``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from irpo.config import TRAINERS, TrainerConfig
from irpo.launch import Allocation, stage_command
from irpo.method import needs_reference
from irpo.rundir import KILL_AT_STEP_ENV
from irpo.training.hooks import NO_HOOKS, StageHooks
from irpo.training.logprobs import sharded_reference_logprobs
from irpo.training.reference import stage_reference
from irpo.training.resume import (
    STOPPED_EXIT,
    StepSaver,
    StopOnSignal,
    discard,
    ds_decide,
    ds_load_state,
    ds_save_state,
)
from irpo.training.torch_trainer import (
    LAYOUT,
    MetricsFn,
    accumulate_metrics,
    batch_order,
    checkpoint_steps,
    example_ids,
    make_scheduler,
    micro_loss,
    plan_steps,
    save_checkpoint,
    set_gradient_checkpointing,
    should_log,
    stage_summary,
    tokenize_for,
)

log = logging.getLogger(__name__)

MODULE = "irpo.training.deepspeed_trainer"
WORK_DIR = "deepspeed"  # under the stage directory: request, DeepSpeed config, metrics, summary


@TRAINERS.backend("deepspeed", builder="irpo.training.deepspeed_trainer:train")
@dataclass
class DeepSpeedTrainerConfig(TrainerConfig):
    """``trainer=deepspeed``: ZeRO over ``num_processes`` workers per node (this module's train)."""

    zero_stage: int = 3  # 2 or 3
    num_processes: int = 2  # workers per node; a SLURM stage spans every node of the allocation
    backend: str = "auto"  # nccl on GPUs, gloo on CPUs


# ------------------------------------------------------------------ the driver's side


def world_size(tcfg, alloc: Allocation | None) -> int:
    return tcfg.num_processes * (len(alloc.nodes) if alloc else 1)


def deepspeed_config(tcfg, dtype: str, world: int) -> dict:
    """The DeepSpeed config of a stage over ``world`` processes; ValueError naming the field."""
    if tcfg.zero_stage not in (2, 3):
        raise ValueError(f"trainer.zero_stage={tcfg.zero_stage}: trainer=deepspeed runs ZeRO stage 2 or 3")
    if tcfg.backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"trainer.backend={tcfg.backend!r} must be auto, nccl or gloo")
    per_rank, rest = divmod(tcfg.batch_size, world * tcfg.grad_accum)
    if rest or per_rank == 0:
        raise ValueError(
            f"trainer.batch_size={tcfg.batch_size} must be a multiple of trainer.grad_accum="
            f"{tcfg.grad_accum} x {world} processes (trainer.num_processes per node x nodes): "
            "every rank takes an equal share of every micro-batch")
    return {
        "train_batch_size": tcfg.batch_size,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "gradient_clipping": tcfg.max_grad_norm,
        "zero_optimization": {"stage": tcfg.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW, see the module docstring
        "bf16": {"enabled": dtype in ("bfloat16", "bf16")},
        "fp16": {"enabled": dtype in ("float16", "fp16")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def launch_command(tcfg, work: Path, alloc=None) -> list[str]:
    """The worker command line: torchrun locally, srun + torchrun on every node of an allocation."""
    return stage_command(["-m", MODULE, str(work)], tcfg.num_processes, alloc=alloc)


def train(cfg, init_path: Path, examples: list[dict], out_dir: Path,
          log_metrics: MetricsFn, step_offset: int, seed: int) -> dict:
    """Train on ``examples`` in ``trainer.num_processes`` x nodes DeepSpeed workers (see module doc)."""
    tcfg = cfg.trainer
    alloc = Allocation.from_env()
    deepspeed_config(tcfg, cfg.model.dtype, world_size(tcfg, alloc))  # fail here, not in N workers
    out_dir = Path(out_dir).resolve()
    work = out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    request = {"cfg": cfg, "init_path": str(Path(init_path).resolve()), "examples": examples,
               "out_dir": str(out_dir), "seed": seed, "step_offset": step_offset}
    with open(work / "request.pkl", "wb") as f:
        pickle.dump(request, f)
    # A resumed stage's workers start a new metrics file; the driver must not read the old one.
    (work / "metrics.jsonl").unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cfg.cache_dir).resolve() / "torch_extensions"))
    cmd = launch_command(tcfg, work, alloc)
    log.info("trainer=deepspeed: %s", " ".join(cmd))
    _run_streaming(cmd, env, work / "metrics.jsonl",
                   lambda rec: log_metrics(rec["metrics"], step_offset + rec["step"]))
    result = work / "summary.json"
    if not result.exists():
        raise RuntimeError(f"trainer=deepspeed: the workers exited without writing {result}")
    (work / "request.pkl").unlink()  # the examples are in the data stage already
    return json.loads(result.read_text())


def _run_streaming(cmd: list[str], env: dict, metrics_file: Path, on_record) -> None:
    """Run ``cmd``; hand each line rank 0 appends to ``metrics_file`` to ``on_record`` as it comes."""
    from irpo.node_tasks import NodeTaskFailed, run_tasks

    offset = 0

    def drain() -> None:
        nonlocal offset
        if not metrics_file.exists():
            return
        with open(metrics_file, "rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a last line may be half written
        offset += len(complete)
        for line in complete.decode().splitlines():
            on_record(json.loads(line))

    try:  # an exception here (a signal) terminates torchrun, which passes it on to its workers
        run_tasks(cmd, "trainer=deepspeed: the workers", env=env, poll=drain)
    except NodeTaskFailed as err:
        raise NodeTaskFailed(f"{err} (exit {STOPPED_EXIT}: stopped by a signal after saving a "
                             f"step checkpoint, which a rerun resumes from). Command: "
                             f"{' '.join(cmd)}", err.node, err.task, err.rank) from None


# ------------------------------------------------------------------ each worker process


def _setup(backend: str):
    """Process group and device of this rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    log.info("deepspeed rank %d of %d on node %s (local rank %d)", dist.get_rank(),
             dist.get_world_size(), os.environ.get("SLURMD_NODENAME", os.uname().nodename),
             local_rank)
    return get_accelerator().device_name(local_rank) if backend == "nccl" else "cpu"


def _reduce_metrics(sums: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def _save(engine, tokenizer, path: Path, zero_stage: int) -> None:
    """A full HF checkpoint written by rank 0 (every rank takes part in the ZeRO-3 gather)."""
    import torch.distributed as dist

    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if dist.get_rank() == 0:
        save_checkpoint(engine.module, tokenizer, path,
                        state if zero_stage == 3 else engine.module.state_dict())
    dist.barrier()


def _load_engine(cfg, init_path: str, ds_config: dict, device, steps: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from irpo.modeling import load_model

    # Kept alive while the model loads: from_pretrained then builds it under
    # deepspeed.zero.Init, straight into ZeRO-3 partitions.
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model, tokenizer = load_model(init_path, cfg.model.dtype, device=device)
    tcfg = cfg.trainer
    set_gradient_checkpointing(model, tcfg)  # before deepspeed.initialize, as HF's Trainer does
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = make_scheduler(optimizer, tcfg, steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=ds_config)
    del hf_ds
    # Under ZeRO-3 each parameter holds only this rank's partition; ds_numel is its full size.
    count = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    log.info("ZeRO-%d engine on %s: %.2fM parameters%s", ds_config["zero_optimization"]["stage"],
             device, count / 1e6,
             ", gradient checkpointing" if engine.module.is_gradient_checkpointing else "")
    return engine, scheduler, tokenizer


def worker(work: Path, hooks: StageHooks = NO_HOOKS) -> None:
    """One rank of the stage: train, write metrics.jsonl and summary.json (rank 0), checkpoints;
    ``hooks`` (irpo.training.hooks) run in every rank (a benchmark's own torchrun script)."""
    import torch.distributed as dist

    req = pickle.loads((work / "request.pkl").read_bytes())
    cfg, tcfg = req["cfg"], req["cfg"].trainer
    device = _setup(tcfg.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(req["seed"])
    ds_config = deepspeed_config(tcfg, cfg.model.dtype, world)
    steps = plan_steps(len(req["examples"]), tcfg)
    engine, scheduler, tokenizer = _load_engine(cfg, req["init_path"], ds_config, device, steps)
    if rank == 0:
        (work / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        (work / "metrics.jsonl").write_text("")
    toks, truncated = tokenize_for(engine.module, tokenizer, req["examples"])
    share = ds_config["train_micro_batch_size_per_gpu"] * tcfg.grad_accum  # a rank's part of a step
    resumed = ds_load_state(engine, Path(req["out_dir"]))  # irpo.training.resume
    refs_all, ref_info = (resumed["refs"], resumed["ref_info"]) if resumed else (None, {})
    if needs_reference(cfg) and resumed is None:  # in batches of that share (torch: of a step's batch)
        hooks.reference("start")
        refs_all, ref_info = stage_reference(
            toks, lambda part: sharded_reference_logprobs(engine.module, part, tokenizer.pad_token_id,
                                                          share, device, LAYOUT),
            tcfg, example_ids(req["examples"]), req["seed"])
        hooks.reference("end")
    refs_all = tuple(r.to(device) for r in refs_all) if refs_all is not None else None
    engine.train()
    with StopOnSignal() as signalled:  # SIGTERM (torchrun passes its own on), SIGUSR2, SIGINT
        history, checkpoints = _train_steps(engine, scheduler, tokenizer, toks, (refs_all, ref_info),
                                            req, steps, ds_config, work, resumed, signalled, hooks)
    if history is None:  # stopped by a signal after saving a step checkpoint
        dist.destroy_process_group()
        sys.exit(STOPPED_EXIT)
    if rank == 0:
        discard(Path(req["out_dir"]))
        summary = stage_summary(steps, len(toks), truncated, checkpoints, history, ref_info)
        (work / "summary.json").write_text(json.dumps({**summary, "world_size": world}))
    dist.barrier()
    dist.destroy_process_group()


def _train_steps(engine, scheduler, tokenizer, toks, refs, req, steps: int, ds_config: dict,
                 work: Path, resumed: dict | None, signalled: StopOnSignal, hooks: StageHooks):
    """The torch trainer's steps, each rank on its share of every batch; (metrics, checkpoints).

    ``refs``: (reference log-probs, their summary); ``resumed``: the client state of the
    step checkpoint this attempt goes on from (irpo.training.resume), or None. After a
    signal every rank finishes the step and saves a step checkpoint: then (None, None).
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    cfg, tcfg, device = req["cfg"], req["cfg"].trainer, engine.device
    rank, micro = dist.get_rank(), ds_config["train_micro_batch_size_per_gpu"]
    share = micro * tcfg.grad_accum
    save_at = checkpoint_steps(steps, tcfg.checkpoints)
    (refs_all, ref_info), out_dir = refs, Path(req["out_dir"])
    history, checkpoints, done = [], [], 0
    if resumed is not None:
        history, done = resumed["history"], resumed["step"]
        checkpoints = [out_dir / name for name in resumed["checkpoints"]]
    saver = StepSaver(tcfg.save_every_steps, tcfg.save_every_min)
    kill_at = os.environ.get(KILL_AT_STEP_ENV)  # fault tests: a rank dies after this global step
    batches = batch_order(len(toks), steps, tcfg.batch_size, req["seed"])
    bar = tqdm(batches[done:], initial=done, total=steps, desc="training", unit="step", disable=rank != 0)
    for step, idx in enumerate(bar, done + 1):
        sums: dict[str, float] = {}
        for start in range(rank * share, (rank + 1) * share, micro):
            part = idx[start : start + micro]
            refs = (refs_all[0][part], refs_all[1][part]) if refs_all else None
            out, logps, b = micro_loss(engine, [toks[i] for i in part], refs, cfg,
                                       tokenizer.pad_token_id, device)
            engine.backward(out.loss)  # scaled by 1/grad_accum; ranks averaged in the reduction
            engine.step()  # the optimiser and the schedule step at the accumulation boundary
            accumulate_metrics(sums, out, logps, b, refs, len(part) / len(idx))
        metrics = {**_reduce_metrics(sums, device),
                   "train/grad_norm": float(engine.get_global_grad_norm()),
                   "train/lr": scheduler.get_last_lr()[0]}
        history.append(metrics)
        if rank == 0 and should_log(step, steps, tcfg):
            with open(work / "metrics.jsonl", "a") as f:  # the driver logs it from there
                f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        hooks.step(step, metrics)
        if rank == 0 and kill_at and kill_at.split(":")[0] == str(req["step_offset"] + step):
            # "<step>" kills rank 0; "<step>:TERM" signals it (as torchrun passes SIGTERM on)
            sig = kill_at.partition(":")[2] or "KILL"
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
        if step in save_at:
            checkpoints.append(out_dir / f"ckpt-{step}")
            _save(engine, tokenizer, checkpoints[-1], tcfg.zero_stage)
        save, stop = ds_decide(saver, step, steps, device, signalled.received is not None)
        if save:
            ds_save_state(engine, out_dir, step, {
                "step": step, "history": history, "checkpoints": [p.name for p in checkpoints],
                "refs": tuple(r.cpu() for r in refs_all) if refs_all is not None else None,
                "ref_info": ref_info})
            saver.saved()
        if stop:
            log.warning("rank %d: stopping after step %d, its step checkpoint saved", rank, step)
            return None, None
    return history, checkpoints


if __name__ == "__main__":
    import warnings

    # DeepSpeed 0.19 calls collectives torch has renamed, warning at every step on every rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.INFO, format="[pid %(process)d] %(levelname)s %(message)s")
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m torch.distributed.run ... -m {MODULE} <stage dir>/{WORK_DIR}")
    worker(Path(sys.argv[1]))
