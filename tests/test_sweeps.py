"""Every study in sweeps/ composes and validates, point by point, as Hydra would run it.

Each script runs with IRPO_SWEEP_DRY_RUN=1, which prints its Hydra multirun
command lines instead of running them. Each line is expanded into its jobs
exactly as Hydra's basic sweeper does (the experiment file's
``hydra.sweeper.params`` first, then the command line; a later value of a key
wins), and every job is composed against conf/, converted with
``irpo.config.to_config`` and checked with ``validate``. Studies that need a
driver feature not there yet must fail composition on exactly that key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from irpo.config import Config, register_configs, to_config
from irpo.config_rules import validate

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SWEEPS = REPO / "sweeps"
register_configs()

# study script -> (MLflow experiment, jobs with one seed, methods, config key it still needs)
STUDIES = {
    "table1": ("table1", 7, {"sft", "star", "star_2x", "dpo", "rpo_2x", "rpo"}, None),
    "nll": ("beta_alpha", 5, {"rpo"}, None),
    "beta": ("beta_alpha", 8, {"rpo"}, None),
    "long_iteration": ("iterations", 2, {"rpo"}, None),
    "double_data": ("iterations", 2, {"rpo", "rpo_2x"}, None),
    "iterative_dpo": ("iterative_dpo", 2, {"dpo", "rpo"}, None),
    "pooled": ("pooled", 3, {"rpo", "dpo", "star"}, "pool_from"),
    "heldout": ("heldout", 1, {"rpo"}, "heldout"),
}
HAS = {f.name for f in dataclasses.fields(Config)}


def dry_run(study: str, *args: str, **env: str) -> list[list[str]]:
    """The Hydra overrides of each `python -m irpo.main -m` command the script would run."""
    proc = subprocess.run(["bash", str(SWEEPS / f"{study}.sh"), *args], capture_output=True,
                          text=True,
                          env={**os.environ, "IRPO_SWEEP_DRY_RUN": "1", "PYTHON": "python",
                               **env}, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    commands = []
    for line in proc.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        argv = shlex.split(line)
        assert argv[:4] == ["python", "-m", "irpo.main", "-m"], line
        commands.append(argv[4:])
    return commands


def _dedupe(overrides: list[str]) -> list[str]:
    """One override per key, the last one winning (what the sweeper hands each job)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    (job,) = batch
    return job


def expand(command: list[str]) -> list[list[str]]:
    """The jobs of one multirun command: sweeper params from the config, then the command.
    The studies' sweeper params live in their experiment files, so composing the
    ``experiment=`` choice alone finds them (and a still-missing key cannot break it)."""
    parser = OverridesParser.create()
    chosen = [o for o in command if o.startswith("experiment=")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hcfg = compose("config", overrides=_dedupe(chosen), return_hydra_config=True)
    params = hcfg.hydra.sweeper.params or {}
    combined = [f"{k}={v}" for k, v in params.items()] + command
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(combined), None)
    return batch


def compose_job(job: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=job))
    validate(cfg)
    return cfg


def uses(override: str, key: str) -> bool:
    """Whether the override sets ``key`` or a key under it (+dataset@heldout.x=... sets heldout)."""
    return key in re.split(r"[+~@.]", override.split("=", 1)[0])


def jobs_of(study: str, *args: str, **env: str) -> list[tuple[Config, bool]]:
    """(config, pending) of every job. A job that uses a config key the driver does not
    have yet must fail on exactly that key; it is then composed without the overrides
    naming the key, so that the rest of it is still checked (pending = True)."""
    needs = STUDIES[study][3]
    out = []
    for command in dry_run(study, *args, **env):
        for job in expand(command):
            if needs and needs not in HAS and any(uses(o, needs) for o in job):
                with pytest.raises(Exception, match=needs):
                    compose_job(job)
                out.append((compose_job([o for o in job if not uses(o, needs)]), True))
            else:
                out.append((compose_job(job), False))
    return out


def check_table1(cfgs: list[Config], t: int) -> None:
    for c in cfgs:
        if c.method.name == "rpo" and c.model.path is not None:  # from the SFT model
            assert c.model.path.endswith("method_sft-seed0/iter1/train/model")
            assert (c.model.name, c.model.builtin, c.iterations) == ("sft", None, t)
        elif c.method.name == "rpo":
            assert c.iterations == t and c.model.builtin is not None
        else:
            assert c.iterations == 1, c.method.name
    assert sum(c.method.name == "rpo" for c in cfgs) == 2


def check_nll(cfgs: list[Config], t: int) -> None:
    assert sorted(c.alpha for c in cfgs) == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert {c.beta for c in cfgs} == {0.1} and {c.iterations for c in cfgs} == {t}


def check_beta(cfgs: list[Config], t: int) -> None:
    assert {(c.beta, c.alpha) for c in cfgs} == set(product([0.05, 0.1, 0.5, 1.0], [0.0, 1.0]))


def check_long_iteration(cfgs: list[Config], t: int) -> None:
    assert {(c.iterations, c.trainer.epochs) for c in cfgs} == {(t, 1.0), (1, float(t))}


def check_double_data(cfgs: list[Config], t: int) -> None:
    got = {(c.method.name, c.iterations, c.method.data_multiplier) for c in cfgs}
    assert got == {("rpo", t, 1), ("rpo_2x", 1, 2)}


def check_iterative_dpo(cfgs: list[Config], t: int) -> None:
    alpha = cfgs[0].dataset.alpha  # rpo's default: the dataset's (paper 1, arith 16)
    assert {(c.method.name, c.alpha, c.iterations) for c in cfgs} == {("dpo", 0.0, t),
                                                                       ("rpo", alpha, t)}


def check_pooled(cfgs: list[Config], t: int) -> None:
    assert [(c.method.name, c.iterations) for c in cfgs] == [("rpo", t), ("dpo", 1), ("star", 1)]
    if "pool_from" in HAS:
        assert [bool(c.pool_from) for c in cfgs] == [False, True, True]


def check_heldout(cfgs: list[Config], t: int) -> None:
    assert [c.iterations for c in cfgs] == [t]
    if "heldout" in HAS:
        assert len(cfgs[0].heldout) >= 1


@pytest.mark.parametrize("dataset", [None, "gsm8k"])
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_point_composes_and_validates(study, dataset):
    experiment, n_jobs, methods, needs = STUDIES[study]
    jobs = jobs_of(study, **({"DATASET": dataset} if dataset else {}))
    assert len(jobs) == n_jobs
    if needs is None or needs in HAS:
        assert not any(pending for _, pending in jobs)
    cfgs = [c for c, _ in jobs]
    name = dataset or "arith"
    t = compose_job([f"dataset={name}"]).dataset.iterations
    for c in cfgs:
        assert c.dataset.name == name and c.tracking.experiment_name == experiment
        assert c.run_name == f"{experiment}-{name}-{c.method.name}"  # studies never share runs
        if name == "gsm8k" and not c.method.name.endswith("_2x"):  # paper sizes
            assert (c.samples_per_prompt, c.pairs_per_prompt) == (30, 10)
    assert {c.method.name for c in cfgs} == methods
    globals()[f"check_{study}"](cfgs, t)


def test_seeds_multiply_points_and_each_init_variant_keeps_its_seed():
    jobs = jobs_of("table1", SEEDS="0,1")
    assert len(jobs) == 14
    assert sorted(c.seed for c, _ in jobs) == [0] * 7 + [1] * 7
    for c, _ in jobs:
        if c.model.name == "sft":
            assert c.model.path.endswith(f"seed{c.seed}/iter1/train/model")


def test_model_path_switch_sets_m0_everywhere_but_the_sft_variant():
    jobs = jobs_of("nll", MODEL_PATH="/ckpt/llama 70b")
    assert {(c.model.path, c.model.builtin) for c, _ in jobs} == {("/ckpt/llama 70b", None)}
    paths = {c.model.path for c, _ in jobs_of("table1", MODEL_PATH="/ckpt")}
    assert "/ckpt" in paths and any(p.endswith("iter1/train/model") for p in paths)


def test_script_arguments_reach_every_command():
    commands = dry_run("table1", "eval.maj_k=4", DATASET="math")
    assert len(commands) == 3 and all(c[-1] == "eval.maj_k=4" for c in commands)
    assert [c.eval.maj_k for c, _ in jobs_of("iterative_dpo", "eval.maj_k=4")] == [4, 4]


def test_every_sweep_file_is_used_and_every_study_documented():
    scripts = {p.stem for p in SWEEPS.glob("*.sh")} - {"_lib"}
    assert scripts == set(STUDIES)
    used = {o.split("=", 1)[1] for s in scripts for cmd in dry_run(s) for o in cmd
            if o.startswith("experiment=")}
    assert used == {f.stem for f in (CONF / "experiment").glob("sweep_*.yaml")}
    readme = (SWEEPS / "README.md").read_text()
    for s in scripts:
        assert f"sweeps/{s}.sh" in readme, s


def test_missing_driver_feature_stops_the_script_before_any_run(tmp_path):
    for study in ("pooled", "heldout"):
        needs = STUDIES[study][3]
        if needs in HAS:
            continue
        proc = subprocess.run(["bash", str(SWEEPS / f"{study}.sh")], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, check=False,
                              env={**os.environ, "IRPO_OUTPUT_ROOT": str(tmp_path),
                                   "PYTHON": sys.executable})
        assert proc.returncode == 3 and f"config key '{needs}'" in proc.stderr
        assert not (tmp_path / "runs").exists()


def test_dedupe_keeps_the_last_value_in_the_first_place():
    assert _dedupe(["seed=0", "a.b=1", "seed=2"]) == ["seed=2", "a.b=1"]
