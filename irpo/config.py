"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

YAML files under ``conf/`` hold values; the schemas here hold types. Every
config group option starts from its schema, stored in the ``schema/<group>``
group (``defaults: [/schema/dataset/hub@_here_, _self_]``), so a misspelt key
or a wrong type fails at composition, before anything runs or is queued on a
cluster. :func:`to_config` turns the composed DictConfig into
these dataclasses and :func:`validate` checks the cross-field rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

# --------------------------------------------------------------------- dataset


@dataclass
class DatasetConfig:
    """Fields every task shares. Sizes of None mean the whole split."""

    name: str = MISSING
    data_dir: str | None = None  # local copy; None -> task default / env var / hub
    train_size: int | None = None
    valid_size: int | None = None  # held-out training prompts for checkpoint selection
    test_size: int | None = None
    prompt_template: str | None = None  # None -> the task's paper prompt
    add_gold_to_winners: bool = False
    max_new_tokens: int = 512
    # Paper defaults for the top-level knobs (config.yaml interpolates them).
    iterations: int = 3
    samples_per_prompt: int = 30
    pairs_per_prompt: int = 10
    temperature: list[float] = field(default_factory=lambda: [0.8])
    alpha: float = 1.0  # NLL weight of rpo (method/rpo.yaml reads it); paper: 1
    maj_k: int = 8  # eval.maj_k reads it: samples per test prompt for majority voting
    # trainer.checkpoints reads it: checkpoints per iteration, evenly spaced; with more than
    # one, the best on the valid split (held-out training prompts) is kept (the paper's way).
    checkpoints: int = 1


@dataclass
class ArithConfig(DatasetConfig):
    """The embedded synthetic multi-step arithmetic task (irpo/tasks/arith.py)."""

    name: str = "arith"
    data_seed: int = 1234
    pretrain_size: int = 20000
    min_ops: int = 2
    max_ops: int = 5
    max_operand: int = 9  # keep equal to conf/dataset/arith.yaml: M0 for other tasks is built from these
    max_value: int = 99  # every intermediate result stays in [0, max_value]


@dataclass
class HubTaskConfig(DatasetConfig):
    """A real benchmark read from a local copy or the Hugging Face hub."""

    hub_name: str | None = None
    hub_config: str | None = None
    num_shots: int = 0


# ----------------------------------------------------------------------- method


@dataclass
class MethodConfig:
    """A method is a data policy, a named loss and an NLL weight (the README's method table)."""

    name: str = MISSING
    data: str = "pairs"  # gold | correct | pairs
    loss: str = "sigmoid"  # preference term, irpo.losses.LOSSES: sigmoid (DPO) | ipo | none
    # Weight of the winner's length-normalised NLL; None: the top-level alpha (the sweep knob).
    nll_weight: float | None = None
    data_multiplier: int = 1  # 2 for the "2x data in one iteration" controls


# ------------------------------------------------------------------------ model


@dataclass
class ModelConfig:
    """``path`` = an HF checkpoint directory or hub name; ``builtin`` = build one here."""

    name: str = MISSING
    path: str | None = None
    builtin: str | None = None  # "tiny": the embedded Llama, pre-trained on first use
    dtype: str = "float32"
    # Learning rate that suits this model's scale; trainer.lr defaults to it
    # (paper: 7e-7 for Llama-2-70B-Chat; a small model built here needs far more).
    lr: float = 7e-7
    # Architecture of the built-in model (ignored for ``path``).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads must be >= 32 for vLLM
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 256
    # Pre-training of the built-in model on the task's pre-training split.
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    # M0's greedy accuracy on this many arith test problems is measured when it is built
    # and recorded beside its weights (0: not measured).
    pretrain_eval_size: int = 1000


# ---------------------------------------------------------------------- sampler


@dataclass
class SamplerConfig:
    name: str = MISSING
    batch_size: int = 64  # prompts per generate call (each expanded to N samples)
    top_p: float = 1.0
    # Prompts per committed chunk of a sample or eval stage: a killed stage loses at most
    # one chunk (irpo/chunks.py). With sampler.nodes > 1 each node chunks its own shard.
    chunk_size: int = 1024


@dataclass
class HFSamplerConfig(SamplerConfig):
    """transformers ``generate`` in the driver (irpo/sampling/hf.py)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1
    # Generation.logprob (the model's own log-prob of each sample) and score() for gold CoT
    # winners: the next stage's DPO reference without a reference pass (irpo/training/reference.py).
    return_logprobs: bool = True


@dataclass
class VLLMSamplerConfig(SamplerConfig):
    """vLLM's offline engine (irpo/sampling/vllm.py); batch_size is unused (vLLM batches itself)."""

    tensor_parallel_size: int = 1  # GPUs per engine
    dtype: str = "auto"  # auto -> model.dtype
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    max_num_seqs: int | None = None  # sequences decoded together; None -> vLLM's default
    enforce_eager: bool | None = None  # None -> True on CPUs, False on GPUs (CUDA graphs)
    return_logprobs: bool = False  # Generation.logprob: reference log-probs of the next stage
    cpu_kvcache_gib: int | None = 1  # VLLM_CPU_KVCACHE_SPACE (CPU only); None -> vLLM's default
    in_process: bool | None = None  # engine in the caller's process; None -> on CPU with tp=1
    engine_seed: int = 0  # the engine's own seed (requests carry their own seeds)
    # Engines on this many nodes of the SLURM allocation, each over a shard of the
    # prompts (1: one engine in the driver). Requests and shards hand off through
    # shard_dir, on a file system every node sees (None: next to the checkpoint).
    nodes: int = 1
    shard_dir: str | None = None


# ---------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    name: str = MISSING
    lr: float = 7e-7
    weight_decay: float = 0.0
    batch_size: int = 16  # pairs (or sequences) per optimiser step
    grad_accum: int = 1  # micro-batches per step; micro-batch = batch_size / grad_accum
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant
    max_grad_norm: float = 1.0
    checkpoints: int = 1  # checkpoints per iteration; >1 -> keep best on validation
    # Step checkpoints a killed or pre-empted train stage resumes from (both trainers;
    # irpo/training/resume.py): every N steps and/or every M minutes of training; None: never.
    save_every_steps: int | None = None
    save_every_min: float | None = 30.0
    log_every: int = 1
    # Keep only each decoder layer's input in the forward and recompute the rest in the
    # backward (one extra forward): a 70B model's activations then fit (docs/cluster.md).
    gradient_checkpointing: bool = False
    # Reference log-probs of DPO from the sampler where it returned them (sampler.return_logprobs:
    # hf's default, vllm's option; irpo/training/reference.py): no reference forward for those.
    sampler_ref_logprobs: bool = True
    ref_check_pairs: int = 8  # pairs whose sampler log-probs are recomputed and compared; 0: none
    ref_check_tolerance: float = 1e-2  # max |sampler - recomputed| summed log-prob, else fail


@dataclass
class TorchTrainerConfig(TrainerConfig):
    """One process (irpo/training/torch_trainer.py)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1


@dataclass
class DeepSpeedTrainerConfig(TrainerConfig):
    zero_stage: int = 3  # 2 or 3
    num_processes: int = 2  # workers per node; a SLURM stage spans every node of the allocation
    backend: str = "auto"  # nccl on GPUs, gloo on CPUs


# ------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    maj_k: int = 8  # samples per test prompt for majority voting (0 disables)
    maj_temperature: float = 0.7
    batch_size: int = 128


# --------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    tracking_uri: str | None = None  # None -> sqlite store under output_root
    experiment_name: str = "irpo"
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags, e.g. sweep=table1
    # The run directory is the record and MLflow its mirror (irpo/tracking.py). A server
    # that does not answer at start: continue (record locally, publish later) or fail.
    on_unavailable: str = "continue"
    timeout_s: float = 5.0  # per request to a tracking server
    retries: int = 1  # per request, before the server counts as down
    retry_every_s: float = 30.0  # while it is down
    flush_timeout_s: float = 30.0  # at the end of a run, for what is still unpublished


# ------------------------------------------------------------------------- root


@dataclass
class Config:
    dataset: Any = MISSING
    method: MethodConfig = MISSING
    model: ModelConfig = MISSING
    sampler: Any = MISSING
    trainer: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Top-level knobs (the ones a sweep varies).
    beta: float = 0.1
    alpha: float = 1.0
    iterations: int = 3
    seed: int = 0
    samples_per_prompt: int = 30
    pairs_per_prompt: int = 10
    temperature: list[float] = field(default_factory=lambda: [0.8])
    max_pairs: int | None = None  # cap on pairs per iteration (None: no cap)
    # Pooled-data ablation: train once on the training data of every iteration of
    # the finished run in this directory (sweeps/pooled.sh).
    pool_from: str | None = None
    # Held-out tasks evaluated after every iteration: +dataset@heldout.<name>=<option>.
    heldout: dict[str, Any] = field(default_factory=dict)
    output_root: str = "outputs"
    cache_dir: str = "outputs/cache"
    run_name: str | None = None  # prefix of the run directory (None: dataset-method)


# Schemas live in their own ConfigStore groups, ``schema/<group>``, apart from the YAML
# options of ``<group>``: stored in ``<group>`` itself they would be listed as options
# (``dataset=nosuch`` offering ``arith_schema``). Each YAML option starts from its schema,
# by absolute path, merged into its own package: ``- /schema/dataset/hub@_here_``
# (methods, ``@package _global_``, use ``- /schema/method/method@method``).
SCHEMA_GROUP = "schema"
_SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"arith": ArithConfig, "hub": HubTaskConfig},
    "method": {"method": MethodConfig},
    "model": {"model": ModelConfig},
    "sampler": {"hf": HFSamplerConfig, "vllm": VLLMSamplerConfig},
    "trainer": {"torch": TorchTrainerConfig, "deepspeed": DeepSpeedTrainerConfig},
    "eval": {"eval": EvalConfig},
    "tracking": {"tracking": TrackingConfig},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in _SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"{SCHEMA_GROUP}/{group}", name=name, node=node)


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and return typed dataclasses (Hydra's own keys dropped)."""
    if "hydra" in cfg:  # present only when composed with return_hydra_config=True
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


# What ``device`` fields accept (irpo.modeling.resolve_device turns them into torch devices).
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message names the key."""


def validate(cfg: Config) -> None:
    """Cross-field rules the schemas cannot express. Raises ConfigError."""
    from irpo.method import method_checks  # imports torch (the loss registry): not at import

    m = cfg.method
    # trainer=deepspeed: every process takes an equal share of each micro-batch.
    zero, procs = getattr(cfg.trainer, "zero_stage", 3), getattr(cfg.trainer, "num_processes", 1)
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


def temperature_at(cfg: Config, iteration: int) -> float:
    """Sampling temperature of iteration ``iteration`` (1-based); the list's last value repeats."""
    return cfg.temperature[min(iteration, len(cfg.temperature)) - 1]
