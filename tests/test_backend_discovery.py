"""A backend is its module and its YAML option: found without a list, composed, validated, built.

The registries of irpo.config watch a package each (irpo.tasks, irpo.sampling, irpo.training)
and import, at their first lookup, the modules whose top level declares a backend
(irpo.registry.declaring_modules). The end-to-end tests here write a new sampler and a new
task into a folder the package searches (appended to its ``__path__``, standing in for a file
dropped into irpo/sampling/ or irpo/tasks/) and its option into a config search path, and then
compose, validate and build them as ``python -m irpo.main sampler=<name>`` would, with no other
file touched. Everything they add (the registry entry, the module, the ConfigStore node) is
removed again afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from irpo.config import SAMPLERS, SCHEMAS, TASKS, TRAINERS, compose, to_config
from irpo.config_rules import validate
from irpo.registry import Registry, declaring_modules
from irpo.sampling import build_sampler, can_score
from irpo.tasks import build_task

SAMPLER_MODULE = '''
"""The ``echo`` sampler: answers each prompt with the prompt reversed plus a suffix."""

from dataclasses import dataclass

from irpo.config import SAMPLERS, SamplerConfig
from irpo.sampling import Generation


@SAMPLERS.backend("echo", builder="irpo.sampling.echo:EchoSampler")
@dataclass
class EchoSamplerConfig(SamplerConfig):
    suffix: str = "!"


class EchoSampler:
    def __init__(self, model_path, cfg, dtype="float32"):
        self.cfg = cfg

    def generate(self, prompts, n, temperature, max_new_tokens, seed, desc="sampling",
                 first_index=0):
        text = [p[::-1] + self.cfg.suffix for p in prompts]
        return [[Generation(t, len(t), True)] * n for t in text]

    def close(self):
        pass
'''

SAMPLER_YAML = """
defaults:
  - /schema/sampler/echo@_here_
  - _self_
name: echo
suffix: "?"
"""

TASK_MODULE = '''
"""The ``count`` task: "How many letters has <word>?", answered by the length."""

from dataclasses import dataclass

from irpo.config import TASKS, DatasetConfig
from irpo.tasks.base import Example


@TASKS.backend("count", builder="irpo.tasks.count:build")
@dataclass
class CountConfig(DatasetConfig):
    name: str = "count"
    words: str = "a bb ccc"


class CountTask:
    name = "count"

    def __init__(self, cfg):
        self.words = cfg.words.split()

    def load_split(self, split):
        return [Example(f"{split}-{i}", w, f"How many letters has {w}?", str(len(w)))
                for i, w in enumerate(self.words)]

    def extract_answer(self, response):
        return response.strip() or None

    def is_correct(self, response, gold_answer):
        return response.strip() == gold_answer


def build(cfg):
    return CountTask(cfg)
'''

TASK_YAML = """
defaults:
  - /schema/dataset/count@_here_
  - _self_
words: "one three eleven"
"""


def test_the_backends_are_the_modules_that_declare_them():
    """Each backend's schema sits in the module of its builder, and discovery finds those."""
    assert declaring_modules("irpo.tasks") == [
        "irpo.tasks.arc", "irpo.tasks.arith", "irpo.tasks.gsm8k", "irpo.tasks.math"]
    assert declaring_modules("irpo.sampling") == ["irpo.sampling.hf", "irpo.sampling.vllm"]
    assert declaring_modules("irpo.training") == [
        "irpo.training.deepspeed_trainer", "irpo.training.torch_trainer"]
    homes = {name: (reg.get(name).schema.__module__, reg.get(name).builder.split(":")[0])
             for reg in (TASKS, SAMPLERS, TRAINERS) for name in reg}
    assert homes == {
        "arith": ("irpo.tasks.arith", "irpo.tasks.arith"),
        # The real benchmarks share one schema, kept beside their shared loading code.
        "gsm8k": ("irpo.tasks.common", "irpo.tasks.gsm8k"),
        "math": ("irpo.tasks.common", "irpo.tasks.math"),
        "math500": ("irpo.tasks.common", "irpo.tasks.math"),
        "arc_challenge": ("irpo.tasks.common", "irpo.tasks.arc"),
        "hf": ("irpo.sampling.hf", "irpo.sampling.hf"),
        "vllm": ("irpo.sampling.vllm", "irpo.sampling.vllm"),
        "torch": ("irpo.training.torch_trainer", "irpo.training.torch_trainer"),
        "deepspeed": ("irpo.training.deepspeed_trainer", "irpo.training.deepspeed_trainer"),
    }


def test_only_top_level_declarations_count(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    files = {
        "a.py": "@REG.backend('a', builder='x:y')\nclass A: pass\n",  # a class decorator
        "b.py": "REG.register('b', entry)\n",  # a call at the top level
        "c.py": "def helper():\n    REG.register('c', entry)\n",  # not at import: no
        "d.py": "import json\nVALUE = json.dumps({})\n",  # a helper module: no
        "_e.py": "REG.register('e', entry)\n",  # private: no
        "__main__.py": "REG.register('m', entry)\n",  # the package's script: no
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("REG.register('s', entry)\n")  # subpackage: no
    monkeypatch.syspath_prepend(str(tmp_path))
    assert declaring_modules("plugpkg") == ["plugpkg.a", "plugpkg.b"]


def test_lookups_discover_but_registration_does_not(tmp_path, monkeypatch):
    pkg = tmp_path / "widgets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from irpo.registry import Registry\n"
                                     "REG = Registry('widget', 'widget.name', package='widgets')\n")
    (pkg / "w.py").write_text("from widgets import REG\nREG.register('w', 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reg: Registry = importlib.import_module("widgets").REG
        reg.register("hand", 0)  # registering by hand triggers no discovery
        assert "widgets.w" not in sys.modules
        assert reg.names() == ["hand", "w"] and "widgets.w" in sys.modules
    finally:
        for name in ("widgets", "widgets.w"):
            sys.modules.pop(name, None)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(package, registry, module name, source, group, yaml): the module in a folder
    the package searches, the option under a config search path; all undone afterwards."""
    added: list[tuple[str, str, str]] = []
    conf = tmp_path / "conf"

    def add(package: str, registry: Registry, module: str, source: str, group: str, yaml: str) -> str:
        folder = tmp_path / package
        folder.mkdir()
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{module}.yaml").write_text(yaml)
        pkg = importlib.import_module(package)
        monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(folder)])
        # The registry as if no lookup had happened yet in this process (restored afterwards).
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_discovered", False)
        added.append((package, module, group))
        return f"hydra.searchpath=[file://{conf}]"

    yield add
    repo = ConfigStore.instance().repo
    for package, module, group in added:
        sys.modules.pop(f"{package}.{module}", None)
        if hasattr(sys.modules[package], module):
            delattr(sys.modules[package], module)
        repo.get("schema", {}).get(group, {}).pop(f"{module}.yaml", None)


def test_a_new_sampler_is_its_module_and_its_yaml(plugin):
    searchpath = plugin("irpo.sampling", SAMPLERS, "echo", SAMPLER_MODULE, "sampler", SAMPLER_YAML)
    assert "echo" in SAMPLERS.names() and set(SCHEMAS["sampler"]) == {"hf", "vllm", "echo"}
    cfg = to_config(compose(["sampler=echo", searchpath]))
    assert type(cfg.sampler).__name__ == "EchoSamplerConfig"
    assert (cfg.sampler.name, cfg.sampler.suffix, cfg.sampler.batch_size) == ("echo", "?", 64)
    validate(cfg)
    sampler = build_sampler(cfg.sampler, "no model", dtype="float32")
    outs = sampler.generate(["abc", "xy"], n=2, temperature=1.0, max_new_tokens=8, seed=0)
    assert [[g.text for g in row] for row in outs] == [["cba?", "cba?"], ["yx?", "yx?"]]
    assert not can_score(cfg.sampler)  # no score(): not a Scorer
    # The schema is in force: a misspelt key fails at composition.
    with pytest.raises(ConfigCompositionException):
        compose(["sampler=echo", "sampler.sufix=x", searchpath])


def test_a_new_task_is_its_module_and_its_yaml(plugin):
    searchpath = plugin("irpo.tasks", TASKS, "count", TASK_MODULE, "dataset", TASK_YAML)
    cfg = to_config(compose(["dataset=count", searchpath]))
    assert type(cfg.dataset).__name__ == "CountConfig"
    validate(cfg)
    test = build_task(cfg.dataset).load_split("test")
    assert [(e.prompt, e.gold_answer) for e in test] == [
        ("How many letters has one?", "3"), ("How many letters has three?", "5"),
        ("How many letters has eleven?", "6")]
    with pytest.raises(ValueError, match=r"dataset.name='nosuch' is not a known task; known: "
                                         r"arc_challenge, arith, count, gsm8k, math, math500"):
        TASKS.get("nosuch")


def test_a_backend_module_run_as_a_script_registers_only_when_imported_by_name():
    """``python -m irpo.training.deepspeed_trainer`` (a worker) runs the module as __main__, then
    unpickles its config, which imports the module by name: one registration, not two."""
    reg: Registry = Registry("widget", "widget.name")
    as_script = type("WidgetConfig", (), {"__module__": "__main__"})
    by_name = type("WidgetConfig", (), {"__module__": "widgets.w"})
    reg.backend("w", builder="widgets.w:build")(as_script)
    reg.backend("w", builder="widgets.w:build")(by_name)
    assert reg.names() == ["w"] and reg.get("w").schema is by_name
