"""irpo.registry: one lookup for tasks, samplers, trainers and losses, and what it feeds.

Checks the generic behaviour on a registry built here (unknown names, duplicate names,
shared schemas, lazy builders), that the ConfigStore's schema groups are exactly the
registries' schemas, and the sampler's declared scoring capability.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from irpo.config import SAMPLERS, SCHEMAS, TASKS, TRAINERS
from irpo.losses import LOSSES
from irpo.registry import Backend, Registry
from irpo.sampling import Scorer, can_score, sampler_class
from irpo.sampling.hf import HFSamplerConfig
from irpo.sampling.vllm import VLLMSamplerConfig
from irpo.tasks import build_task
from irpo.tasks.arith import ArithConfig
from irpo.tasks.common import HubTaskConfig
from irpo.training import get_trainer


@dataclass
class _A:
    x: int = 1


@dataclass
class _B:
    y: int = 2


def _registry() -> Registry[Backend]:
    reg: Registry[Backend] = Registry("widget", "widget.name")
    reg.backend("a", builder="json:dumps")(_A)
    reg.register("b1", Backend(_B, "json:loads", schema_name="b"))
    reg.register("b2", Backend(_B, "json:loads", schema_name="b"))
    return reg


def test_unknown_name_is_one_line_naming_the_field_and_the_known_names():
    with pytest.raises(ValueError) as info:
        _registry().get("c")
    assert str(info.value) == "widget.name='c' is not a known widget; known: a, b1, b2"
    assert _registry().get("c", None) is None  # with a default: dict.get's behaviour


def test_names_schemas_and_lazy_builders():
    import json

    reg = _registry()
    assert reg.names() == ["a", "b1", "b2"]
    assert reg.schemas() == {"a": _A, "b": _B}  # two backends, one shared schema
    assert reg.load("a") is json.dumps and reg.load("b2") is json.loads


def test_a_name_registered_twice_and_a_schema_name_used_twice_are_refused():
    reg = _registry()
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a", Backend(_B, "json:loads"))
    reg.register("c", Backend(_A, "json:loads", schema_name="b"))
    with pytest.raises(ValueError, match="schema name 'b' stands for two schemas"):
        reg.schemas()


def test_a_missing_builder_module_names_the_backend():
    reg: Registry[Backend] = Registry("sampler", "sampler.name")
    reg.register("gone", Backend(_A, "irpo.no_such_module:Sampler"))
    with pytest.raises(ImportError, match="sampler=gone needs irpo.no_such_module"):
        reg.load("gone")


def test_config_store_schemas_are_the_registries():
    assert SCHEMAS["dataset"] == {"arith": ArithConfig, "hub": HubTaskConfig}
    assert SCHEMAS["sampler"] == {"hf": HFSamplerConfig, "vllm": VLLMSamplerConfig}
    assert SCHEMAS["trainer"] == TRAINERS.schemas() and set(SCHEMAS["trainer"]) == {"torch", "deepspeed"}
    assert TASKS.names() == ["arc_challenge", "arith", "gsm8k", "math", "math500"]
    assert LOSSES.names() == ["ipo", "none", "sigmoid"]


def test_every_declared_builder_is_importable():
    from irpo.sampling.hf import HFSampler
    from irpo.tasks.arith import ArithTask
    from irpo.training.torch_trainer import train

    assert sampler_class("hf") is HFSampler
    assert get_trainer("torch") is train
    assert isinstance(build_task(ArithConfig(pretrain_size=10, train_size=2)), ArithTask)
    for name in TASKS.names() + SAMPLERS.names() + TRAINERS.names():
        reg = TASKS if name in TASKS else SAMPLERS if name in SAMPLERS else TRAINERS
        assert callable(reg.load(name)), name
    with pytest.raises(ValueError, match="trainer.name='jax' is not a known trainer backend; known: deepspeed, torch"):
        get_trainer("jax")


def test_scoring_is_the_samplers_declared_capability():
    assert issubclass(sampler_class("hf"), Scorer) and issubclass(sampler_class("vllm"), Scorer)
    assert can_score(HFSamplerConfig(name="hf"))  # return_logprobs is hf's default
    assert not can_score(HFSamplerConfig(name="hf", return_logprobs=False))
    assert not can_score(VLLMSamplerConfig(name="vllm"))  # log-probs off by default
    assert can_score(VLLMSamplerConfig(name="vllm", return_logprobs=True))
    assert not can_score(VLLMSamplerConfig(name="vllm", return_logprobs=True, nodes=2))


def test_a_sampler_without_score_cannot_score(monkeypatch):
    class GenerateOnly:
        def __init__(self, model_path, cfg, dtype):
            pass

    monkeypatch.setattr(SAMPLERS, "load", lambda name: GenerateOnly)
    assert not issubclass(GenerateOnly, Scorer)
    assert not can_score(HFSamplerConfig(name="hf"))
