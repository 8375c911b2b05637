"""Cross-field rules of the configuration, the ones the schemas cannot express.

:func:`validate` runs after composition and before anything starts (irpo.main), so a
config that composes but cannot run fails with one line naming the key.
"""

from __future__ import annotations

import re

from irpo.config import Config, ConfigError

# What ``device`` fields accept (irpo.modeling.resolve_device turns them into torch devices).
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def validate(cfg: Config) -> None:
    """Cross-field rules the schemas cannot express. Raises ConfigError."""
    from irpo.method import method_checks  # imports torch (the loss registry): not at import
    from irpo.training.deepspeed_trainer import DeepSpeedTrainerConfig  # torch too

    m = cfg.method
    # trainer=deepspeed: every process takes an equal share of each micro-batch.
    deepspeed = isinstance(cfg.trainer, DeepSpeedTrainerConfig)
    zero = cfg.trainer.zero_stage if deepspeed else 3
    procs = cfg.trainer.num_processes if deepspeed else 1
    checks: list[tuple[bool, str]] = [
        *method_checks(cfg),  # first: an unknown method.loss is the only line then
        (cfg.beta > 0, f"beta={cfg.beta} must be > 0"),
        (
            cfg.pool_from is None or (cfg.iterations == 1 and m.data in ("pairs", "correct")),
            f"pool_from={cfg.pool_from}: pooling trains a single iteration (iterations=1) "
            f"with method data pairs or correct; got iterations={cfg.iterations}, data={m.data}",
        ),
        (cfg.iterations >= 1, f"iterations={cfg.iterations} must be >= 1"),
        (cfg.samples_per_prompt >= 1, f"samples_per_prompt={cfg.samples_per_prompt} must be >= 1"),
        (cfg.pairs_per_prompt >= 1, f"pairs_per_prompt={cfg.pairs_per_prompt} must be >= 1"),
        (len(cfg.temperature) >= 1, "temperature must list at least one value"),
        (all(t >= 0 for t in cfg.temperature), f"temperature={cfg.temperature} must be >= 0"),
        (m.data_multiplier in (1, 2), f"method.data_multiplier={m.data_multiplier} must be 1 or 2"),
        (
            # One sample gives a winner or a loser, never both: no pair, or (with the gold CoT
            # as a winner) the same (gold, sample) pair pairs_per_prompt times.
            m.data != "pairs" or cfg.samples_per_prompt * m.data_multiplier >= 2,
            (f"samples_per_prompt={cfg.samples_per_prompt}: method={m.name} builds (winner, loser) "
             "pairs from each prompt's samples and needs at least 2"),
        ),
        (
            # The samplers refuse it too (irpo.sampling.hf._check_args), but only at iteration
            # 1's sample stage, after M0's evaluation.
            0 not in cfg.temperature[: max(cfg.iterations, 1)]
            or cfg.samples_per_prompt * m.data_multiplier == 1,
            f"temperature={cfg.temperature}: 0 is greedy decoding, one sample per prompt, but "
            f"samples_per_prompt={cfg.samples_per_prompt}"
            + (f" x method.data_multiplier={m.data_multiplier}" if m.data_multiplier != 1 else "")
            + " asks for more",
        ),
        (
            cfg.trainer.batch_size % cfg.trainer.grad_accum == 0,
            f"trainer.batch_size={cfg.trainer.batch_size} must be divisible by "
            f"trainer.grad_accum={cfg.trainer.grad_accum}",
        ),
        (cfg.trainer.checkpoints >= 1, f"trainer.checkpoints={cfg.trainer.checkpoints} must be >= 1"),
        (
            cfg.trainer.checkpoints == 1 or (cfg.dataset.valid_size or 0) >= 1,
            f"trainer.checkpoints={cfg.trainer.checkpoints} picks the best checkpoint on the valid "
            f"split, but dataset.valid_size={cfg.dataset.valid_size} holds no prompts",
        ),
        (cfg.sampler.chunk_size >= 1, f"sampler.chunk_size={cfg.sampler.chunk_size} must be >= 1"),
        (cfg.trainer.ref_check_pairs >= 0,
         f"trainer.ref_check_pairs={cfg.trainer.ref_check_pairs} must be >= 0 (0 disables the check)"),
        (cfg.trainer.ref_check_tolerance > 0,
         f"trainer.ref_check_tolerance={cfg.trainer.ref_check_tolerance} must be > 0"),
        (zero in (2, 3), f"trainer.zero_stage={zero}: trainer=deepspeed runs ZeRO stage 2 or 3"),
        (
            cfg.trainer.batch_size % (cfg.trainer.grad_accum * procs) == 0,
            f"trainer.batch_size={cfg.trainer.batch_size} must be a multiple of trainer.grad_accum="
            f"{cfg.trainer.grad_accum} x trainer.num_processes={procs} (x nodes on SLURM)",
        ),
        *[(_DEVICE.fullmatch(str(getattr(node, "device", "auto"))) is not None,
           f"{key}.device={getattr(node, 'device', None)!r} must be auto, cpu, cuda or cuda:<index>")
          for key, node in (("trainer", cfg.trainer), ("sampler", cfg.sampler))],
        (
            cfg.trainer.schedule in ("linear", "cosine", "constant"),
            f"trainer.schedule={cfg.trainer.schedule!r} must be linear, cosine or constant",
        ),
        (
            (cfg.model.path is None) != (cfg.model.builtin is None),
            "model: set exactly one of model.path (a checkpoint) and model.builtin",
        ),
        (
            cfg.tracking.backend in ("mlflow", "none"),
            f"tracking.backend={cfg.tracking.backend!r} must be mlflow or none",
        ),
        (
            cfg.tracking.on_unavailable in ("continue", "fail"),
            f"tracking.on_unavailable={cfg.tracking.on_unavailable!r} must be continue or fail",
        ),
        (cfg.tracking.timeout_s > 0, f"tracking.timeout_s={cfg.tracking.timeout_s} must be > 0"),
        (cfg.tracking.retries >= 0, f"tracking.retries={cfg.tracking.retries} must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)

