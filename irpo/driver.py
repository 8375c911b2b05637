"""The iteration loop: M0 -> (sample -> label -> data -> train -> eval) x T.

Every stage hands off to the next through files in the run directory (see
irpo.rundir), so a rerun of the same command resumes at the first unfinished
stage. Iteration 0 only evaluates M0. Called by irpo.main; usable directly:

    from irpo.driver import run
    summary = run(cfg, raw_dictconfig)
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from irpo.builtin_model import ensure_builtin_model
from irpo.builtin_record import pin_run_to_model
from irpo.chunks import discard_chunks, run_chunks, stage_chunk_size
from irpo.config import Config, ConfigError, temperature_at
from irpo.evaluate import evaluate
from irpo.method import needs_reference
from irpo.modeling import resolve_device
from irpo.node_tasks import check_shared_folders
from irpo.pairs import NoTrainingData, build_examples, pool_examples
from irpo.record import StepLog, run_record, stage_record, write_run_summary
from irpo.rundir import KILL_AT_STEP_ENV, RunDir, config_hash, read_jsonl, write_jsonl
from irpo.runlock import RunInProgress, RunLock
from irpo.sampling import build_sampler, can_score
from irpo.summary import iteration_rows, render_table
from irpo.tasks import Example, Task, build_task
from irpo.tracking import (
    build_tracker,
    flatten,
    read_tracking_file,
    run_label,
    run_tags,
    write_tracking_file,
)
from irpo.training import get_trainer
from irpo.training.resume import RESUME_DIR

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage could not produce its output; the message says which and why."""


@dataclass
class Context:
    cfg: Config
    task: Task
    run: RunDir
    tracker: object  # irpo.tracking: MLflowTracker or NullTracker
    splits: dict[str, list[Example]]
    _sampler: tuple[Path, object] | None = field(default=None, repr=False)

    def sampler(self, model_path: Path):
        """One sampler per model: eval of M(t-1) and sampling from it share an engine."""
        if self._sampler is None or self._sampler[0] != model_path:
            self.close_sampler()
            self._sampler = (model_path, build_sampler(self.cfg.sampler, model_path, self.cfg.model.dtype))
        return self._sampler[1]

    def close_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler[1].close()
            self._sampler = None


def initial_model(cfg: Config) -> Path:
    if cfg.model.builtin is not None:
        return ensure_builtin_model(cfg.model, cfg.dataset, Path(cfg.cache_dir))
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise StageError(f"model.path={cfg.model.path}: no Hugging Face checkpoint there "
                         "(config.json missing); point it at a save_pretrained directory")
    return path


def stage_sample(ctx: Context, t: int, model: Path, out: Path) -> dict:
    """N samples per training prompt, in committed chunks (irpo.chunks) a rerun reuses."""
    cfg = ctx.cfg
    n = cfg.samples_per_prompt * cfg.method.data_multiplier
    temp = temperature_at(cfg, t)
    examples = ctx.splits["train"]
    scoring_s = 0.0

    def one_chunk(first: int, part: list[Example]) -> list[dict]:
        nonlocal scoring_s
        gens = ctx.sampler(model).generate(
            [e.prompt for e in part], n, temp, cfg.dataset.max_new_tokens, cfg.seed * 1000 + t,
            desc=f"iter {t} sampling {first}-{first + len(part)}/{len(examples)}", first_index=first)
        records = [{"id": e.id, "prompt": e.prompt, "gold_answer": e.gold_answer,
                    "gold_cot": e.gold_cot,
                    "samples": [{"text": g.text, "num_tokens": g.num_tokens, "finished": g.finished,
                                 **({"logprob": g.logprob} if g.logprob is not None else {})}
                                for g in gs]} for e, gs in zip(part, gens)]
        if scores_gold(cfg):
            scoring_s += score_gold(ctx, t, model, records)
        return records

    records = run_chunks(out, examples, stage_chunk_size(cfg.sampler, len(examples)), one_chunk,
                         f"iter{t}/sample")
    discard_chunks(out)
    write_jsonl(out / "samples.jsonl", records)
    tokens = sum(s["num_tokens"] for r in records for s in r["samples"])
    unfinished = sum(not s["finished"] for r in records for s in r["samples"])
    scored = ({"gold_scored": sum("gold_logprob" in r for r in records),
               "gold_scoring_s": round(scoring_s, 2)} if scores_gold(cfg) else {})
    return {"prompts": len(records), "samples": len(records) * n, "temperature": temp,
            "tokens_sampled": tokens, "unfinished": unfinished, **scored}


def scores_gold(cfg: Config) -> bool:
    """Whether the sample stage scores the gold CoTs (see :func:`score_gold`)."""
    # Scoring given texts is the sampler's declared capability (irpo.sampling.Scorer).
    return bool(needs_reference(cfg) and cfg.dataset.add_gold_to_winners and cfg.trainer.sampler_ref_logprobs
                and can_score(cfg.sampler))


def score_gold(ctx: Context, t: int, model: Path, records: list[dict]) -> float:
    """Adds ``gold_logprob`` to ``records``; returns the seconds it took.

    With gold CoTs among the DPO winners and the sampler's log-probs as the reference
    (``sampler=vllm``, ``return_logprobs``, one engine), the engine scores each gold CoT
    with one prefill, so the trainer needs no reference forward at all (irpo.pairs carries
    the value, irpo.training.reference checks a sample of them).
    """
    with_gold = [r for r in records if r.get("gold_cot")]
    start = time.perf_counter()
    values = ctx.sampler(model).score([r["prompt"] for r in with_gold], [r["gold_cot"] for r in with_gold],
                                      desc=f"iter {t} scoring gold CoTs")
    for r, v in zip(with_gold, values):
        if v is not None:
            r["gold_logprob"] = v
    return time.perf_counter() - start


def stage_label(ctx: Context, t: int, out: Path) -> dict:
    from tqdm.auto import tqdm

    records = read_jsonl(ctx.run.stage_dir(t, "sample") / "samples.jsonl")
    correct = total = both = 0
    for r in tqdm(records, desc=f"iter {t} labelling", unit="prompt"):
        for s in r["samples"]:
            s["correct"] = ctx.task.is_correct(s["text"], r["gold_answer"])
        flags = [s["correct"] for s in r["samples"]]
        correct += sum(flags)
        total += len(flags)
        both += any(flags) and not all(flags)
    write_jsonl(out / "labelled.jsonl", records)
    return {"frac_correct": correct / max(total, 1), "prompts_with_both": both}


def pooled_data(cfg: Config, out: Path) -> dict:
    """The pooled-data ablation: every finished iteration's train.jsonl of ``pool_from``."""
    source = RunDir(Path(cfg.pool_from))
    lists, t = [], 1
    while source.done_info(t, "data") is not None:
        lists.append(read_jsonl(source.stage_dir(t, "data") / "train.jsonl"))
        t += 1
    if not lists:
        raise StageError(f"iteration 1, stage 'data': pool_from={cfg.pool_from} has no finished "
                         "data stage (no iter1/data/DONE); point it at a finished run directory")
    examples = pool_examples(lists, cfg.method.data, max_examples=cfg.max_pairs, seed=cfg.seed)
    write_jsonl(out / "train.jsonl", examples)
    return {"data_examples": len(examples), "pooled_iterations": len(lists)}


def stage_data(ctx: Context, t: int, out: Path) -> dict:
    cfg = ctx.cfg
    if cfg.pool_from is not None:
        return pooled_data(cfg, out)
    if cfg.method.data == "gold":
        records = [{"id": e.id, "prompt": e.prompt, "gold_cot": e.gold_cot, "samples": []}
                   for e in ctx.splits["train"]]
    else:
        records = read_jsonl(ctx.run.stage_dir(t, "label") / "labelled.jsonl")
    try:
        examples, stats = build_examples(
            records, cfg.method.data, cfg.pairs_per_prompt * cfg.method.data_multiplier,
            add_gold_to_winners=cfg.dataset.add_gold_to_winners, max_examples=cfg.max_pairs,
            seed=cfg.seed * 1000 + t)
    except NoTrainingData as e:
        raise StageError(f"iteration {t}, stage 'data' ({ctx.run.path}): {e}") from None
    write_jsonl(out / "train.jsonl", examples)
    return {f"data_{k}": v for k, v in stats.as_dict().items()}


def stage_train(ctx: Context, t: int, init: Path, out: Path) -> dict:
    cfg = ctx.cfg
    examples = read_jsonl(ctx.run.stage_dir(t, "data") / "train.jsonl")
    offset = sum(ctx.run.done_info(i, "train")["steps"] for i in range(1, t))
    if not (out / RESUME_DIR).exists():  # no step checkpoint: a killed attempt's leftovers go
        for stale in [*out.glob("ckpt-*"), out / "model"]:
            shutil.rmtree(stale, ignore_errors=True)
    steps = StepLog(out)  # the record first (committed with the stage), then MLflow

    def log_step(metrics: dict[str, float], step: int) -> None:
        ctx.tracker.publish(steps.append(metrics, step))
        # Fault tests (trainer=deepspeed: a worker rank dies instead, irpo.training.deepspeed_trainer).
        if os.environ.get(KILL_AT_STEP_ENV) == str(step) and cfg.trainer.name == "torch":
            ctx.tracker.flush(timeout=30)
            os.kill(os.getpid(), signal.SIGKILL)

    info = get_trainer(cfg.trainer.name)(cfg, init, examples, out, log_step,
                                         offset, cfg.seed * 1000 + t)
    ckpts = [out / name for name in info["checkpoints"]]
    best, scores = ckpts[-1], {}
    if len(ckpts) > 1:  # keep the checkpoint with the best validation accuracy
        for ck in ckpts:
            m = evaluate(ctx.task, ctx.sampler(ck), ctx.splits["valid"],
                         max_new_tokens=cfg.dataset.max_new_tokens, maj_k=0,
                         maj_temperature=0.0, seed=cfg.seed, prefix="valid")
            scores[ck.name] = m["valid/accuracy"]
        ctx.close_sampler()
        best = max(ckpts, key=lambda c: scores[c.name])  # first of equals: earliest step
    best.rename(out / "model")
    for ck in ckpts:
        shutil.rmtree(ck, ignore_errors=True)
    return {**info, "selected": best.name, "valid_scores": scores}


def stage_eval(ctx: Context, t: int, model: Path, out: Path) -> dict:
    cfg = ctx.cfg
    metrics = evaluate(ctx.task, ctx.sampler(model), ctx.splits["test"],
                       max_new_tokens=cfg.dataset.max_new_tokens, maj_k=cfg.eval.maj_k,
                       maj_temperature=cfg.eval.maj_temperature, seed=cfg.seed, prefix="test",
                       out_file=out / "predictions.jsonl",
                       chunks=(out, stage_chunk_size(cfg.sampler, len(ctx.splits["test"])),
                               f"iter{t}/eval"))
    return metrics


def stage_heldout(ctx: Context, t: int, model: Path, out: Path) -> dict:
    """Test accuracy of other tasks (cfg.heldout), to see whether the gains carry over."""
    cfg, metrics = ctx.cfg, {}
    for name, dcfg in cfg.heldout.items():
        task = build_task(dcfg)
        m = evaluate(task, ctx.sampler(model), task.load_split("test"),
                     max_new_tokens=dcfg.max_new_tokens, maj_k=cfg.eval.maj_k,
                     maj_temperature=cfg.eval.maj_temperature, seed=cfg.seed,
                     prefix=f"heldout/{name}", out_file=out / f"{name}.jsonl")
        metrics.update(m)
    return metrics


def _stage(ctx: Context, t: int, name: str, fn, resumable: bool = False) -> dict:
    final, info = ctx.run.run_stage(t, name, fn, resumable)
    if not info["skipped"]:  # a skipped stage's record was published when the run started
        ctx.tracker.publish(stage_record(final, t))
    return info


def evaluate_all(ctx: Context, t: int, model: Path) -> None:
    _stage(ctx, t, "eval", lambda out: stage_eval(ctx, t, model, out), resumable=True)
    if ctx.cfg.heldout:
        _stage(ctx, t, "heldout", lambda out: stage_heldout(ctx, t, model, out))


def iterate(ctx: Context, m0: Path) -> None:
    cfg = ctx.cfg
    evaluate_all(ctx, 0, m0)
    model = m0
    for t in range(1, cfg.iterations + 1):
        if cfg.method.data != "gold" and cfg.pool_from is None:
            _stage(ctx, t, "sample", lambda out: stage_sample(ctx, t, model, out), resumable=True)
            _stage(ctx, t, "label", lambda out: stage_label(ctx, t, out))
        _stage(ctx, t, "data", lambda out: stage_data(ctx, t, out))
        # M(t-1) is not sampled from again, and a GPU engine must not hold memory while training.
        ctx.close_sampler()
        _stage(ctx, t, "train", lambda out: stage_train(ctx, t, model, out),
               resumable=True)  # from its step checkpoints (irpo.training.resume)
        model = ctx.run.stage_dir(t, "train") / "model"
        evaluate_all(ctx, t, model)


def preflight(cfg: Config) -> None:
    """What only the machine the run is on can check, before anything runs; ConfigError naming the field.

    The devices (``trainer.device=cuda`` without a GPU) and, for ``trainer=deepspeed``,
    that the batch divides over every rank of the SLURM allocation's nodes: otherwise these
    would fail at the first train stage, after M0's evaluation and the first sampling.
    """
    try:
        for key, node in (("trainer", cfg.trainer), ("sampler", cfg.sampler)):
            if hasattr(node, "device"):
                resolve_device(node.device, f"{key}.device")
        if cfg.trainer.name == "deepspeed":
            from irpo.launch import Allocation
            from irpo.training.deepspeed_trainer import deepspeed_config, world_size

            deepspeed_config(cfg.trainer, cfg.model.dtype, world_size(cfg.trainer, Allocation.from_env()))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_inputs(cfg: Config) -> tuple[Task, dict[str, list[Example]]]:
    """The task, its splits and M0's checkpoint, checked before anything is created."""
    preflight(cfg)
    try:
        task = build_task(cfg.dataset)
        splits = {s: task.load_split(s) for s in ("train", "valid", "test")}
    except (ValueError, OSError) as err:  # data not found, a bad file or record: one line
        raise ConfigError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    if cfg.model.builtin is None:
        initial_model(cfg)  # a missing checkpoint fails here
    return task, splits


def tracking_tags(run_dir: RunDir, raw: DictConfig, resolved: dict) -> dict[str, str]:
    """The run's tags, fixed by its first attempt (a later sync publishes the same ones)."""
    state = read_tracking_file(run_dir.path)
    if "tags" not in state:
        state["tags"] = run_tags(resolved, run_dir.path, config_hash(raw))
        write_tracking_file(run_dir.path, state)
    return state["tags"]


def run(cfg: Config, raw: DictConfig) -> dict:
    """Run (or resume) one experiment; returns its summary.

    Bad input fails before anything is created; a second launch of a run in progress
    is refused (irpo.runlock); the tracker publishes what the run directory records.
    """
    task, splits = check_inputs(cfg)
    try:
        check_shared_folders(cfg)  # stages on several nodes hand files through these
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tracker = build_tracker(cfg.tracking, cfg.output_root)
    name = cfg.run_name or f"{cfg.dataset.name}-{cfg.method.name}"
    run_dir = RunDir.for_config(raw, cfg.output_root, name)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(run_dir.path).acquire()
    except RunInProgress as err:
        raise StageError(str(err)) from None
    try:
        return _run_locked(cfg, raw, task, splits, tracker, run_dir)
    finally:
        lock.release()


def _run_locked(cfg: Config, raw: DictConfig, task: Task, splits: dict, tracker,
                run_dir: RunDir) -> dict:
    log.info("run directory: %s", run_dir.path)
    m0 = initial_model(cfg)
    try:
        pin_run_to_model(run_dir.path, m0)  # before the tracker: a refused resume logs nothing
    except ValueError as err:
        raise StageError(str(err)) from None
    run_dir.save_config(raw)
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]),
                                      resolve=True)
    tracker.start(run_dir.path, flatten(resolved), tracking_tags(run_dir, raw, resolved),
                  run_label(resolved))
    tracker.publish(run_record(run_dir.path))  # what earlier attempts recorded
    ctx = Context(cfg, task, run_dir, tracker, splits)
    try:
        iterate(ctx, m0)
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        ctx.close_sampler()
    rows = iteration_rows(run_dir, cfg.iterations)
    table = render_table(rows, cfg.eval.maj_k)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (run_dir.path / "summary.md").write_text(table + f"\n\npeak RSS: {peak_mb:.0f} MiB\n")
    tracker.publish(write_run_summary(run_dir.path, {"peak_rss_mb": peak_mb}, cfg.iterations))
    tracker.finish("FINISHED", [run_dir.path / f for f in ("config.yaml", "summary.md")])
    print("\n" + table + f"\n\npeak RSS {peak_mb:.0f} MiB; run directory {run_dir.path}")
    if tracker.ui_hint:
        print(f"MLflow: {tracker.ui_hint}")
    final = rows[-1]
    return {"final_test_accuracy": final["test_acc"], "rows": rows, "run_dir": str(run_dir.path)}
