"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

The schemas here are the one place a default is written: they hold every field's type
and default, and a YAML option under ``conf/`` holds only what it changes relative to
its schema, plus interpolations that wire a field to another group
(``trainer.lr: ${model.lr}``; a trainer config built in Python has no model group to
follow, so its schema keeps a constant). tests/test_config_defaults.py fails on a YAML
value that restates its schema's default and on a default that is dead.

Every config group option starts from its schema, stored in the ``schema/<group>``
group (``defaults: [/schema/dataset/hub@_here_, _self_]``), so a misspelt key or a
wrong type fails at composition, before anything runs or is queued on a cluster.
:func:`to_config` turns the composed DictConfig into these dataclasses,
:func:`compose` composes outside a Hydra app (tools, tests) and
:func:`irpo.config_rules.validate` checks the cross-field rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from irpo.registry import Backend, Registry

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The backends each config group selects (irpo.registry): a backend's schema is declared
# here with its name and its builder, and these registries fill both the ConfigStore's
# ``schema/<group>`` and the lookup that builds the configured backend.
TASKS: Registry[Backend] = Registry("task", "dataset.name")
SAMPLERS: Registry[Backend] = Registry("sampler", "sampler.name")
TRAINERS: Registry[Backend] = Registry("trainer backend", "trainer.name")

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


@TASKS.backend("arith", builder="irpo.tasks.arith:build_arith")
@dataclass
class ArithConfig(DatasetConfig):
    """The embedded synthetic multi-step arithmetic task (irpo/tasks/arith.py).

    These defaults are ``dataset=arith`` (conf/dataset/arith.yaml changes none of them), and
    M0 for every other task is pre-trained on ``ArithConfig()``'s pretrain split: one source.
    The sizes and difficulty are tuned so that the tiny model pre-trains in minutes on two
    CPU cores and leaves clear headroom; the pretrain split depends only on data_seed,
    pretrain_size and the difficulty fields, so other sizes reuse the cached M0.
    """

    name: str = "arith"
    data_seed: int = 1234
    pretrain_size: int = 20000
    train_size: int | None = 1024
    valid_size: int | None = 128
    test_size: int | None = 1000  # s.e. of an accuracy near 50%: 1.6 points
    min_ops: int = 2
    max_ops: int = 5
    max_operand: int = 9  # operands 1..max_operand; factors and divisors 2..5
    max_value: int = 99  # every intermediate result stays in [0, max_value]
    add_gold_to_winners: bool = True  # as the paper does on GSM8K (conf/dataset/arith.yaml)
    max_new_tokens: int = 96  # the longest gold CoT is ~70 tokens
    samples_per_prompt: int = 4
    pairs_per_prompt: int = 2
    temperature: list[float] = field(default_factory=lambda: [1.0])
    maj_k: int = 4  # maj@4: evaluation stays cheaper than sampling
    # A stronger NLL term than the paper's alpha=1 (conf/dataset/arith.yaml says why).
    alpha: float = 4.0


@dataclass
class HubTaskConfig(DatasetConfig):
    """A real benchmark read from a local copy or the Hugging Face hub."""

    hub_name: str | None = None
    hub_config: str | None = None
    num_shots: int = 0
    # The paper's checkpoint selection: 4 evenly spaced checkpoints per iteration, the best
    # on the valid split (held-out training prompts) kept.
    checkpoints: int = 4


for _name, _builder in {"gsm8k": "irpo.tasks.gsm8k:build", "math": "irpo.tasks.math:build",
                        "math500": "irpo.tasks.math:build_500",
                        "arc_challenge": "irpo.tasks.arc:build"}.items():
    TASKS.register(_name, Backend(HubTaskConfig, _builder, schema_name="hub"))
del _name, _builder


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
    # Architecture of the built-in model (ignored for ``path``): the only built-in, "tiny",
    # is these defaults (conf/model/tiny.yaml).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads must be >= 32 for vLLM
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 2048  # long real-task prompts (GSM8K, MATH) still fit
    # Pre-training of the built-in model on the task's pre-training split, chosen among
    # candidates for an M0 that a change of rounding moves little and that leaves the
    # iterations headroom (README, "The built-in model M0").
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    # 3e-3 before: there a change of rounding alone moved M0 by up to 17 points (README).
    pretrain_lr: float = 1e-3
    # Seeds 0/1/2 land at 64.4/52.3/58.3%: 1 is nearest the paper's 55.6% M0 (README).
    pretrain_seed: int = 1
    # M0's greedy accuracy on this many arith test problems is measured when it is built
    # and recorded beside its weights (0: not measured).
    pretrain_eval_size: int = 1000


# ---------------------------------------------------------------------- sampler


@dataclass
class SamplerConfig:
    """Fields every sampler shares; ``sampler=<name>`` picks a subclass below."""

    name: str = MISSING
    batch_size: int = 64  # prompts per generate call (each expanded to N samples)
    top_p: float = 1.0
    # Prompts per committed chunk of a sample or eval stage: a killed stage loses at most
    # one chunk (irpo/chunks.py). With sampler.nodes > 1 each node chunks its own shard.
    chunk_size: int = 1024


@SAMPLERS.backend("hf", builder="irpo.sampling.hf:HFSampler")
@dataclass
class HFSamplerConfig(SamplerConfig):
    """transformers ``generate`` in the driver (irpo/sampling/hf.py)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1
    # Generation.logprob (the model's own log-prob of each sample) and score() for gold CoT
    # winners: the next stage's DPO reference without a reference pass (irpo/training/reference.py).
    return_logprobs: bool = True


@SAMPLERS.backend("vllm", builder="irpo.sampling.vllm:VLLMSampler")
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
    """Fields both trainers share. The options follow ``model.lr`` and ``dataset.checkpoints``;
    these constants serve trainer configs built in Python, where no such group exists."""

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


@TRAINERS.backend("torch", builder="irpo.training.torch_trainer:train")
@dataclass
class TorchTrainerConfig(TrainerConfig):
    """One process (irpo/training/torch_trainer.py)."""

    device: str = "auto"  # auto: the GPU if there is one, else the CPU; or cpu, cuda, cuda:1


@TRAINERS.backend("deepspeed", builder="irpo.training.deepspeed_trainer:train")
@dataclass
class DeepSpeedTrainerConfig(TrainerConfig):
    """ZeRO over ``num_processes`` workers per node (irpo/training/deepspeed_trainer.py)."""

    zero_stage: int = 3  # 2 or 3
    num_processes: int = 2  # workers per node; a SLURM stage spans every node of the allocation
    backend: str = "auto"  # nccl on GPUs, gloo on CPUs


# ------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    """Test-split evaluation after every iteration: greedy accuracy and maj@k."""

    maj_k: int = "${dataset.maj_k}"  # samples per test prompt for majority voting (0 disables)
    maj_temperature: float = 0.7


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
    """The root (conf/config.yaml picks the group options).

    ``dataset``, ``sampler`` and ``trainer`` are typed by their group's base schema: OmegaConf
    2.3 refuses a Union of dataclasses, and a node typed by the base takes the option's
    subclass when the option's schema is merged in (``sampler=vllm`` -> VLLMSamplerConfig).
    """

    dataset: DatasetConfig = MISSING
    method: MethodConfig = MISSING
    model: ModelConfig = MISSING
    sampler: SamplerConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Top-level knobs (the ones a sweep varies); the dataset's paper values unless a method
    # (iterations, alpha) or the command line sets them. A "${...}" default is an OmegaConf
    # interpolation (what omegaconf.II writes), resolved when the config is.
    beta: float = 0.1
    alpha: float = 1.0  # weight of the length-normalised NLL term (method/rpo.yaml: dataset.alpha)
    iterations: int = "${dataset.iterations}"  # the baseline methods set 1
    seed: int = 0
    samples_per_prompt: int = "${dataset.samples_per_prompt}"  # N
    pairs_per_prompt: int = "${dataset.pairs_per_prompt}"  # K
    temperature: list[float] = "${dataset.temperature}"  # per iteration; the last value repeats
    max_pairs: int | None = None  # cap on pairs per iteration (None: no cap)
    # Pooled-data ablation: train once on the training data of every iteration of
    # the finished run in this directory (sweeps/pooled.sh).
    pool_from: str | None = None
    # Held-out tasks evaluated after every iteration: +dataset@heldout.<name>=<option>.
    heldout: dict[str, DatasetConfig] = field(default_factory=dict)
    output_root: str = "${oc.env:IRPO_OUTPUT_ROOT,outputs}"
    cache_dir: str = "${oc.env:IRPO_CACHE_DIR,${output_root}/cache}"
    run_name: str | None = None  # prefix of the run directory (None: dataset-method)


# Schemas live in their own ConfigStore groups, ``schema/<group>``, apart from the YAML
# options of ``<group>``: stored in ``<group>`` itself they would be listed as options
# (``dataset=nosuch`` offering ``arith_schema``). Each YAML option starts from its schema,
# by absolute path, merged into its own package: ``- /schema/dataset/hub@_here_``
# (methods, ``@package _global_``, use ``- /schema/method/method@method``).
SCHEMA_GROUP = "schema"
SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": TASKS.schemas(),
    "method": {"method": MethodConfig},
    "model": {"model": ModelConfig},
    "sampler": SAMPLERS.schemas(),
    "trainer": TRAINERS.schemas(),
    "eval": {"eval": EvalConfig},
    "tracking": {"tracking": TrackingConfig},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
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


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """``conf/<config_name>`` composed by Hydra as ``python -m irpo.main <overrides>`` would,
    outside a Hydra app (tools, tests, benchmarks); unresolved, as the app sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message names the key."""


def temperature_at(cfg: Config, iteration: int) -> float:
    """Sampling temperature of iteration ``iteration`` (1-based); the list's last value repeats."""
    return cfg.temperature[min(iteration, len(cfg.temperature)) - 1]
