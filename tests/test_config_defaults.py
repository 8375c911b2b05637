"""One source of truth for every default: the schemas hold them (irpo/config.py, and each
backend's in its own module), the YAML options under conf/ hold only what they change.

Definitions the tests enforce (for each option of a schema-backed group, ``conf/<group>/*.yaml``,
and for the root, ``conf/config.yaml``; the option's schema is the one its ``defaults`` list
names, ``/schema/<group>/<name>``):

* **Restated**: an option sets a key to exactly its schema's default for that field (raw values
  compared, an interpolation string included). It says nothing and can silently drift from the
  schema. Method options (``@package _global_``) are checked under ``method:`` against
  MethodConfig and at the top level against Config.
* **Dead default**: a schema field with a default (not MISSING) that either
  (a) nothing reads it: its qualified name (``eval.maj_k``) appears neither in irpo/'s source
      outside the schemas (irpo/config.py and every schema class) nor in an interpolation
      (conf/, or a schema default), and
      where no other group's schema has a field of that name, the bare name appears in no such
      module as an attribute (``.maj_temperature``) or a string (``"maj_temperature"``). A
      shared name (``batch_size``: sampler, trainer) must be read qualified, by the group or by
      a variable assigned from it (``tcfg = cfg.trainer`` ... ``tcfg.lr``), since a bare
      ``.batch_size`` could be any of them; the root's fields (``seed``) are read bare; or
  (b) no composed run sees: every option built on that schema sets the field, at least one of
      them to a constant. Not dead: a field that every option wires to another group by an
      interpolation (``trainer.lr: ${model.lr}``), whose default is the value of configs built
      in Python, such as a trainer's in the tests, where no other group exists; and a default
      of None, which declares the field optional (``hub_config``) rather than choosing a value.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from irpo.config import CONF_DIR, SCHEMAS, Config

IRPO = Path(__file__).resolve().parents[1] / "irpo"
SCHEMA_REF = re.compile(r"^/schema/(\w+)/(\w+)@")


def field_defaults(schema: type) -> dict[str, object]:
    """Field -> default as written in the schema (default_factory called); MISSING skipped."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if value is not MISSING:
            out[f.name] = value
    return out


def as_plain(value: object) -> object:
    """A dataclass default as the YAML loader would give it (dataclass instances as dicts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def options() -> list[tuple[str, Path, type, dict, dict]]:
    """(group, file, schema, values under the schema, top-level values) for every option."""
    found = []
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        refs = [m.groups() for d in raw.get("defaults", []) if isinstance(d, str)
                for m in [SCHEMA_REF.match(d)] if m]
        if not refs:
            continue  # launcher, experiment: options of groups without a schema
        (group, name), = refs
        body = {k: v for k, v in raw.items() if k != "defaults"}
        if group == "method":  # @package _global_: the method's node plus top-level knobs
            found.append((group, path, SCHEMAS[group][name], body.pop("method", {}), body))
        else:
            found.append((group, path, SCHEMAS[group][name], body, {}))
    return found


def root_values() -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    return {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}


def restated(values: dict, schema: type) -> list[str]:
    defaults = field_defaults(schema)
    return [f"{key}: {value!r}" for key, value in values.items()
            if key in defaults and as_plain(defaults[key]) == value]


def test_the_option_files_are_found():
    groups = {group for group, *_ in options()}
    assert groups == set(SCHEMAS) - set(), groups  # every schema group has at least one option
    assert len(options()) >= 15


def test_no_yaml_value_restates_its_schema_default():
    problems = []
    for _group, path, schema, values, top in options():
        problems += [f"{path.relative_to(CONF_DIR)}: {r} is {schema.__name__}'s default"
                     for r in restated(values, schema)]
        problems += [f"{path.relative_to(CONF_DIR)}: {r} is Config's default"
                     for r in restated(top, Config)]
    problems += [f"config.yaml: {r} is Config's default" for r in restated(root_values(), Config)]
    assert not problems, "YAML values that restate a schema default (drop them):\n" + "\n".join(problems)


def readers() -> tuple[str, str]:
    """(irpo/'s source but the schemas, every interpolation in conf/ and in the schemas)."""
    sources = "\n".join(p.read_text() for p in IRPO.rglob("*.py") if p != IRPO / "config.py")
    # A backend's schema lives in its module (irpo.registry): its own lines read nothing.
    backend_schemas = {inspect.getsource(s) for g in SCHEMAS.values() for s in g.values()
                       if s.__module__ != "irpo.config"}
    assert backend_schemas and all(s in sources for s in backend_schemas)
    for text in backend_schemas:
        sources = sources.replace(text, "")
    wiring = re.findall(r"\$\{[^}]*\}", "\n".join(p.read_text() for p in CONF_DIR.rglob("*.yaml"))
                        + (IRPO / "config.py").read_text() + "\n".join(backend_schemas))
    return sources, "\n".join(wiring)


def is_read(group: str, name: str, shared: bool, sources: str, wiring: str) -> bool:
    bare = re.search(rf"\.{name}\b|[\"']{name}[\"']", sources) is not None
    if not group:  # a root field
        return bare or f"${{{name}" in wiring
    names = {group, *re.findall(rf"(\w+) = [\w.\[\]\"]*\.{group}\b", sources)}  # and aliases
    qualified = rf"\b(?:{'|'.join(sorted(names))})\.{name}\b"
    return re.search(qualified, sources + wiring) is not None or (bare and not shared)


def test_no_schema_default_is_dead():
    sources, wiring = readers()
    groups_of: dict[str, set[str]] = {}  # field name -> the groups whose schemas have one
    for group, schemas in SCHEMAS.items():
        for schema in schemas.values():
            for f in dataclasses.fields(schema):
                groups_of.setdefault(f.name, set()).add(group)
    users: dict[type, list[dict]] = {}  # schema -> the values each of its options sets
    for _group, _path, schema, values, _top in options():
        users.setdefault(schema, []).append(values)
    users[Config] = [root_values()]
    problems = []
    schemas = [(g, s) for g, group in SCHEMAS.items() for s in group.values()] + [("", Config)]
    for group, schema in schemas:
        for name in field_defaults(schema):
            if not is_read(group, name, len(groups_of.get(name, ())) > 1, sources, wiring):
                problems.append(f"{schema.__name__}.{name}: read by no module of irpo/")
            sets = [v[name] for v in users.get(schema, []) if name in v]
            wired = all(isinstance(v, str) and "${" in v for v in sets)
            optional = field_defaults(schema)[name] is None
            if users.get(schema) and len(sets) == len(users[schema]) and not (wired or optional):
                problems.append(f"{schema.__name__}.{name}: every option sets it ({sets})")
    assert not problems, "dead schema defaults:\n" + "\n".join(problems)


@pytest.mark.parametrize("option", ["dataset=arith", "dataset=gsm8k", "model=tiny"])
def test_arith_defaults_are_the_arith_option(option, tmp_path):
    """The M0 of every task is pre-trained from ArithConfig() (irpo/builtin_model.py): the
    arith option composes to exactly those values, and model=tiny to ModelConfig's."""
    from irpo.builtin_model import ensure_builtin_model, pretrain_data_config, shipped_model_dir
    from irpo.config import ModelConfig, compose, to_config
    from irpo.tasks.arith import ArithConfig

    cfg = to_config(compose([option]))
    if option == "dataset=arith":
        assert cfg.dataset == ArithConfig()
    assert dataclasses.replace(cfg.model, lr=ModelConfig.lr, name="tiny", builtin="tiny") \
        == dataclasses.replace(ModelConfig(name="tiny", builtin="tiny"), lr=ModelConfig.lr)
    # Every default composes to the shipped M0's config: nothing is built.
    assert pretrain_data_config(cfg.dataset) == pretrain_data_config(None)
    assert ensure_builtin_model(cfg.model, cfg.dataset, tmp_path) == shipped_model_dir("tiny")


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def test_no_experiment_restates_what_it_composes_to_without_it():
    """An experiment (``@package _global_``) is a bundle of overrides: a value equal to what
    its own group choices compose to without it (``trainer.zero_stage: 3`` over
    trainer=deepspeed) restates the schema or an option. Compared raw, for every method a
    sweep of it runs (``sweep_iterative_dpo`` sets iterations back to the dataset's for dpo)."""
    from irpo.config import compose

    problems = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        overrides = [f"{key.removeprefix('override /')}={value}"  # its own group choices
                     for item in raw.get("defaults", []) if isinstance(item, dict)
                     for key, value in item.items()]
        sweep = raw.get("hydra", {}).get("sweeper", {}).get("params", {})
        methods = str(sweep["method"]).split(",") if "method" in sweep else [None]
        body = leaves({k: v for k, v in raw.items() if k not in ("defaults", "hydra")})
        same = set(body)
        for method in methods:
            base = leaves(OmegaConf.to_container(
                compose([*overrides, *([f"method={method}"] if method else [])]), resolve=False))
            same &= {k for k, v in body.items() if k in base and base[k] == v}
        problems += [f"experiment/{path.name}: {k}: {body[k]!r}" for k in sorted(same)]
    assert not problems, ("experiment values that change nothing (drop them):\n"
                          + "\n".join(problems))


def test_moving_defaults_kept_the_run_directories():
    """Moving the defaults into the schemas changed no run's config: the run-directory hashes
    are the ones the YAML-held defaults gave (measured before the move, irpo/rundir.py), so
    existing runs are found and resumed. eval.batch_size, removed as read by nothing, is
    hashed at its old value (rundir.RETIRED_FIELDS). A change that fails this moves every
    run directory: make it on purpose, then update the hashes here (done once since: the
    tiny model's lr 3e-4 -> 1e-4 and arith's alpha 4 -> 16, retuned on the current M0; the hf
    sampler's greedy_batch_size, added with the shipped M0, whose runs are new anyway)."""
    from irpo.config import compose
    from irpo.rundir import config_hash

    mine = "~local"  # without this machine's conf/local/default.yaml, if it has one
    assert config_hash(compose(["experiment=smoke", mine])) == "1cd23a8270"
    assert config_hash(compose([mine])) == "8239be66f6"  # dataset=arith method=rpo
    assert config_hash(compose(["dataset=gsm8k", mine])) == "ef4abd5f27"
