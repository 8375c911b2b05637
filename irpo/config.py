"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

The schemas are the one place a default is written: the base schemas and the root here,
each backend's own (a task, sampler or trainer) in its module beside the code it configures,
registered in :data:`TASKS`, :data:`SAMPLERS` or :data:`TRAINERS`. They hold every field's
type and default, and a YAML option under ``conf/`` holds only what it changes relative to
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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from irpo.registry import Backend, Registry

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The backends each config group selects (irpo.registry). A backend declares its schema (a
# subclass of the group's base schema below), its name and its builder in its own module of
# the package named here, which the registry finds at its first lookup; these registries
# fill both the ConfigStore's ``schema/<group>`` and the lookup that builds the backend.
TASKS: Registry[Backend] = Registry("task", "dataset.name", package="irpo.tasks")
SAMPLERS: Registry[Backend] = Registry("sampler", "sampler.name", package="irpo.sampling")
TRAINERS: Registry[Backend] = Registry("trainer backend", "trainer.name", package="irpo.training")

# --------------------------------------------------------------------- dataset


@dataclass
class DatasetConfig:
    """Fields every task shares. Sizes of None mean the whole split.

    Each task's schema subclasses it in the task's module: ``ArithConfig`` in
    irpo/tasks/arith.py, ``HubTaskConfig`` (the real benchmarks) in irpo/tasks/common.py."""

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
    builtin: str | None = None  # "tiny": the embedded Llama, shipped in irpo/assets (docs/builtin_model.md)
    dtype: str = "float32"
    # Learning rate that suits this model's scale; trainer.lr defaults to it
    # (paper: 7e-7 for Llama-2-70B-Chat; a small model built here needs far more).
    lr: float = 7e-7
    # Architecture and pre-training of the built-in model (ignored for ``path``): the only
    # built-in, "tiny", is these defaults, and these defaults are the shipped file; any other
    # value is built on first use (docs/builtin_model.md says why each was chosen).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads must be >= 32 for vLLM
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 2048  # long real-task prompts (GSM8K, MATH) still fit
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    pretrain_lr: float = 1e-3
    pretrain_seed: int = 1
    # M0's greedy accuracy on this many arith test problems is measured when it is built
    # and recorded beside its weights (0: not measured).
    pretrain_eval_size: int = 1000


# ---------------------------------------------------------------------- sampler


@dataclass
class SamplerConfig:
    """Fields every sampler shares; ``sampler=<name>`` picks the subclass declared in that
    backend's module (``HFSamplerConfig`` in irpo/sampling/hf.py)."""

    name: str = MISSING
    batch_size: int = 64  # prompts per generate call (each expanded to N samples)
    top_p: float = 1.0
    # Prompts per committed chunk of a sample or eval stage: a killed stage loses at most
    # one chunk (irpo/chunks.py). With sampler.nodes > 1 each node chunks its own shard.
    chunk_size: int = 1024


# ---------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """Fields every trainer shares; ``trainer=<name>`` picks the subclass declared in that
    backend's module (``TorchTrainerConfig`` in irpo/training/torch_trainer.py). The options
    follow ``model.lr`` and ``dataset.checkpoints``; these constants serve trainer configs
    built in Python, where no such group exists."""

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


_GROUPS: dict[str, Registry[Backend] | type] = {
    "dataset": TASKS, "method": MethodConfig, "model": ModelConfig, "sampler": SAMPLERS,
    "trainer": TRAINERS, "eval": EvalConfig, "tracking": TrackingConfig,
}


class _Schemas(Mapping[str, dict[str, type]]):
    """Group -> {schema name -> schema}. A backend group's schemas are read from its registry
    when asked, so that importing this module imports no backend (irpo.registry)."""

    def __getitem__(self, group: str) -> dict[str, type]:
        source = _GROUPS[group]
        return source.schemas() if isinstance(source, Registry) else {group: source}

    def __iter__(self) -> Iterator[str]:
        return iter(_GROUPS)

    def __len__(self) -> int:
        return len(_GROUPS)


SCHEMAS: Mapping[str, dict[str, type]] = _Schemas()


def register_configs() -> None:
    """Store the root schema and every group's schemas (backends found now) in the ConfigStore."""
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
