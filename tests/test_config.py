"""Every dataset x method composes and validates; bad configs fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from irpo.config import Config, ConfigError, register_configs, temperature_at, to_config
from irpo.config_rules import validate
from irpo.method import needs_reference, nll_weight
from irpo.tasks.arith import ArithConfig
from irpo.tasks.common import HubTaskConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def load(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=list(overrides)))
    validate(cfg)
    return cfg


def test_groups_exist():
    for group in ("dataset", "method", "model", "sampler", "trainer", "eval", "tracking",
                  "launcher", "experiment"):
        assert options(group), group
    assert {"sft", "star", "dpo", "rpo", "star_2x", "rpo_2x"} <= set(options("method"))
    assert {"arith", "gsm8k", "math", "arc_challenge"} <= set(options("dataset"))


@pytest.mark.parametrize("dataset", options("dataset"))
@pytest.mark.parametrize("method", options("method"))
def test_every_dataset_method_composes(dataset, method):
    cfg = load(f"dataset={dataset}", f"method={method}")
    assert cfg.dataset.name == dataset
    assert cfg.method.name == method
    assert isinstance(cfg.dataset, ArithConfig if dataset == "arith" else HubTaskConfig)
    if method == "dpo":
        assert cfg.alpha == 0.0
    if method.endswith("_2x"):
        assert cfg.iterations == 1 and cfg.method.data_multiplier == 2
    elif method == "rpo":  # only IRPO iterates (the paper's Table 1)
        assert cfg.iterations == cfg.dataset.iterations
    else:
        assert cfg.iterations == 1


@pytest.mark.parametrize("overrides, want", [
    (("method=dpo",), 1), (("method=dpo", "iterations=3"), 3), (("method=rpo",), 3),
    (("method=sft",), 1), (("method=star", "iterations=2"), 2), (("method=rpo", "iterations=1"), 1),
    (("method=rpo", "dataset=gsm8k"), 4), (("method=dpo", "dataset=gsm8k"), 1),
    (("method=dpo", "experiment=sweep_iterative_dpo"), 3),
])
def test_each_method_defaults_to_the_papers_iterations(overrides, want):
    """The method config owns the default; a command-line ``iterations=`` still wins."""
    assert load(*overrides).iterations == want


@pytest.mark.parametrize("overrides, loss, weight, reference", [
    (("method=rpo",), "sigmoid", 16.0, True),  # arith's alpha
    (("method=rpo", "alpha=0.5"), "sigmoid", 0.5, True),  # the sweep knob
    (("method=rpo", "alpha=0"), "sigmoid", 0.0, True),  # sweep_nll's DPO point
    (("method=rpo", "dataset=gsm8k"), "sigmoid", 1.0, True),  # the paper's alpha
    (("method=rpo_2x",), "sigmoid", 16.0, True),
    (("method=dpo",), "sigmoid", 0.0, True),
    (("method=ipo",), "ipo", 16.0, True),
    (("method=ipo", "alpha=0"), "ipo", 0.0, True),  # plain IPO
    (("method=rpo", "method.loss=ipo"), "ipo", 16.0, True),
    (("method=sft",), "none", 1.0, False),
    (("method=star", "alpha=3"), "none", 1.0, False),  # alpha does not apply to NLL-only methods
    (("method=star_2x",), "none", 1.0, False),
])
def test_each_method_names_its_loss_and_nll_weight(overrides, loss, weight, reference):
    """What the trainers read: the named loss, the NLL weight (alpha where the method follows
    it), and whether reference log-probs are needed (the loss's property)."""
    cfg = load(*overrides)
    assert (cfg.method.loss, nll_weight(cfg), needs_reference(cfg)) == (loss, weight, reference)


def test_paper_defaults_reach_top_level_knobs():
    cfg = load("dataset=gsm8k")
    assert (cfg.samples_per_prompt, cfg.pairs_per_prompt, cfg.iterations) == (30, 10, 4)
    assert cfg.dataset.add_gold_to_winners is True
    assert [temperature_at(cfg, t) for t in (1, 2, 3, 4)] == [0.8, 0.8, 1.3, 1.3]
    assert (cfg.beta, cfg.alpha) == (0.1, 1.0)
    cfg = load("dataset=gsm8k", "samples_per_prompt=4", "temperature=[1.0]")
    assert cfg.samples_per_prompt == 4 and temperature_at(cfg, 3) == 1.0


def test_devices_default_to_auto():
    cfg = load()
    assert (cfg.trainer.device, cfg.sampler.device) == ("auto", "auto")
    cfg = load("trainer=deepspeed", "sampler=vllm")  # each rank / engine picks its own GPU
    assert not hasattr(cfg.trainer, "device") and not hasattr(cfg.sampler, "device")


def test_user_sweep_overrides_compose():
    for method in ("rpo", "dpo"):
        for beta in (0.05, 0.1, 0.5):
            cfg = load(f"method={method}", f"beta={beta}")
            assert (cfg.method.name, cfg.beta) == (method, beta)


@pytest.mark.parametrize("override, match", [
    ("betaa=0.1", "betaa"),
    ("trainer.lrr=1", "lrr"),
    ("beta=abc", "beta"),
    ("iterations=2.5", "iterations"),
])
def test_typos_and_wrong_types_fail_at_composition(override, match):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as e:
        load(override)
    assert match in str(e.value) + str(e.value.__cause__)


def test_unknown_method_names_the_group():
    with pytest.raises(Exception, match="method/nosuch"):
        load("method=nosuch")


@pytest.mark.parametrize("overrides, match", [
    (("method=dpo", "alpha=0.5"), "method=dpo .* alpha=0.5"),
    (("beta=0",), "beta=0"),
    (("alpha=-1",), "alpha=-1"),
    (("method.nll_weight=-1",), r"method.nll_weight=-1.0 must be >= 0"),
    (("method=sft", "method.nll_weight=0"), "method=sft: method.loss=none and an NLL weight of 0"),
    (("method=star", "method.loss=ipo"), "method=star: method.loss=ipo needs data=pairs"),
    (("trainer.batch_size=10", "trainer.grad_accum=3"), "divisible"),
    (("model.path=/x",), "exactly one of model.path"),
    (("temperature=[]",), "temperature"),
    (("trainer.device=gpu",), r"trainer.device='gpu' must be auto, cpu, cuda"),
    (("sampler.device=cuda:x",), r"sampler.device='cuda:x' must be"),
])
def test_contradictions_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load(*overrides)
