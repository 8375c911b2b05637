"""``trainer=deepspeed``: its config and launch command, the same loss curve as
``trainer=torch``, a checkpoint that loads and samples, and one iteration of the loop.

The slow tests start real DeepSpeed workers (2 CPU processes over gloo, via
torchrun). The first run on a machine compiles DeepSpeed's shared-memory op
(about a minute), cached under outputs/test-cache/torch_extensions.

Tolerance of the loss-curve comparison: 2e-5 absolute per step. Both runs are
float32 and see the same batches; they differ only in the order of float
additions -- gradients averaged over 2 ranks instead of summed in one batch,
micro-batches padded to their own widths, reference log-probs scored in other
batches. Measured: at most 1e-6 (ZeRO-3 and ZeRO-2, 6 steps). A wrong
gradient scale, schedule step or clipping shows in the logged grad norm, lr or
the loss at the 1e-3 level and above.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_CACHE, run_main
from test_config import load
from test_reference import recomputed_refs, with_refs
from test_trainer import make_cfg, tiny_ckpt  # noqa: F401  (tiny_ckpt: a fixture)

from irpo import node_tasks
from irpo.config import ConfigError, SamplerConfig
from irpo.launch import Allocation
from irpo.modeling import load_model
from irpo.sampling.hf import HFSampler
from irpo.training import deepspeed_trainer, torch_trainer
from irpo.training.data import pair_batch, tokenize_examples
from irpo.training.deepspeed_trainer import (
    MODULE,
    DeepSpeedTrainerConfig,
    deepspeed_config,
    launch_command,
    world_size,
)
from irpo.training.logprobs import batch_logprobs

LOSS_TOL = 2e-5
# Metrics that vary smoothly with the weights (reward accuracy does not: at
# step 1 policy = reference and the rewards are 0 up to rounding).
SMOOTH = ["train/loss", "train/dpo", "train/nll", "logps/chosen", "logps/rejected",
          "logps/chosen_delta", "logps/rejected_delta", "rewards/margin", "train/grad_norm",
          "train/lr"]
ALLOC = Allocation("4242", ("gpu001", "gpu002"), "10.1.0.1")


def ds_trainer(**kwargs) -> DeepSpeedTrainerConfig:
    return DeepSpeedTrainerConfig(name="deepspeed", **kwargs)


def test_each_batch_splits_evenly_over_processes():
    ds = deepspeed_config(ds_trainer(batch_size=16, grad_accum=2, zero_stage=3), "float32", 4)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2  # 16 = 2 per micro-batch x 2 steps x 4 ranks
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # float32 stays float32
    assert deepspeed_config(ds_trainer(batch_size=8, zero_stage=2), "bf16", 2)["bf16"]["enabled"]
    with pytest.raises(ValueError, match=r"batch_size=8 must be a multiple of trainer.grad_accum=1 x 16"):
        deepspeed_config(ds_trainer(batch_size=8), "float32", 16)
    with pytest.raises(ValueError, match="zero_stage=1"):
        deepspeed_config(ds_trainer(zero_stage=1), "float32", 2)
    with pytest.raises(ValueError, match="backend='mpi'"):
        deepspeed_config(ds_trainer(backend="mpi"), "float32", 2)


def test_config_composes_and_bad_settings_fail_before_running():
    cfg = load("trainer=deepspeed")
    assert (cfg.trainer.name, cfg.trainer.zero_stage, cfg.trainer.num_processes) == ("deepspeed", 3, 2)
    assert cfg.trainer.lr == cfg.model.lr
    with pytest.raises(ConfigError, match="zero_stage=1"):
        load("trainer=deepspeed", "trainer.zero_stage=1")
    with pytest.raises(ConfigError, match="batch_size=6 must be a multiple of .*num_processes=4"):
        load("trainer=deepspeed", "trainer.batch_size=6", "trainer.num_processes=4")


def test_worker_command_is_torchrun_locally_and_srun_in_an_allocation(tmp_path):
    tcfg = ds_trainer(num_processes=4)
    local = launch_command(tcfg, tmp_path, alloc=None)
    assert local[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
                         "-m", MODULE, str(tmp_path)]
    slurm = launch_command(tcfg, tmp_path, alloc=ALLOC)
    assert slurm[:8] == ["srun", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                         "--nodelist=gpu001,gpu002", "--kill-on-bad-exit=1", "--label"]
    assert slurm[9:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2",
                         "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.0.1:29742", "--rdzv-id=4242",
                         "-m", MODULE, str(tmp_path)]
    assert world_size(tcfg, ALLOC) == 8 and world_size(tcfg, None) == 4


def test_driver_side_launches_srun_and_logs_metrics_as_they_come(tmp_path, monkeypatch):
    """train() inside an allocation: srun command, extension cache, metrics at global steps."""
    seen = {}

    class FakeWorkers:  # stands in for srun + torchrun: writes what rank 0 would
        stdout = io.BytesIO(b"0: worker output\n")

        def __init__(self, cmd, env, **pipes):
            seen.update(cmd=cmd, env=env)
            work = Path(cmd[-1])
            seen["request"] = (work / "request.pkl").exists()
            lines = [json.dumps({"step": s, "metrics": {"train/loss": 1.0 / s}}) for s in (1, 2)]
            (work / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            (work / "summary.json").write_text(json.dumps({"steps": 2, "checkpoints": ["ckpt-2"]}))

        def poll(self):
            return 0

        returncode = 0

    monkeypatch.setattr(deepspeed_trainer.Allocation, "from_env", staticmethod(lambda: ALLOC))
    monkeypatch.setattr(node_tasks.subprocess, "Popen", FakeWorkers)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    cfg = dataclasses.replace(make_cfg(), trainer=ds_trainer(batch_size=8, num_processes=2),
                              cache_dir=str(tmp_path / "cache"))
    logged = []
    info = deepspeed_trainer.train(cfg, tmp_path, [{"prompt": "p", "chosen": "c"}], tmp_path / "out",
                                   lambda m, s: logged.append((s, m)), 10, 0)
    assert info == {"steps": 2, "checkpoints": ["ckpt-2"]}
    assert seen["cmd"][0] == "srun" and seen["cmd"][-3:] == ["-m", MODULE, str(tmp_path / "out/deepspeed")]
    assert seen["request"] and not (tmp_path / "out/deepspeed/request.pkl").exists()
    assert seen["env"]["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "cache/torch_extensions")
    assert logged == [(11, {"train/loss": 1.0}), (12, {"train/loss": 0.5})]
    bad = dataclasses.replace(cfg, trainer=ds_trainer(batch_size=6, num_processes=2))
    with pytest.raises(ValueError, match=r"x 4 processes"):  # 2 per node x 2 nodes
        deepspeed_trainer.train(bad, tmp_path, [], tmp_path / "bad", print, 0, 0)


# ------------------------------------------------------------------ real DeepSpeed workers

TRAIN = {"lr": 1e-3, "batch_size": 8, "grad_accum": 2, "epochs": 2.0, "warmup_ratio": 0.2,
         "schedule": "cosine", "checkpoints": 2}


def run(train_fn, cfg, path, pairs, out):
    logged = []
    info = train_fn(cfg, path, pairs, out, lambda m, s: logged.append((s, m)), 100, 0)
    return info, logged


@pytest.fixture(scope="module")
def torch_run(tiny_ckpt, tmp_path_factory):  # noqa: F811
    path, pairs = tiny_ckpt
    out = tmp_path_factory.mktemp("torch")
    return (*run(torch_trainer.train, make_cfg(**TRAIN), path, pairs, out), out)


HOOKED_WORKER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from irpo.training.deepspeed_trainer import worker
from irpo.training.hooks import StageHooks

def note(*event):
    with open(Path(sys.argv[2]) / f"rank{dist.get_rank()}.jsonl", "a") as f:
        f.write(json.dumps(event) + "\\n")

worker(Path(sys.argv[1]), StageHooks(on_reference=note, on_step=lambda s, m: note(s, m["train/loss"])))
"""


@pytest.mark.slow
def test_hooks_run_in_every_worker(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A script of ours under torchrun calls worker() with hooks (what a benchmark of the
    DeepSpeed trainer does): every rank sees the reference pass, then each step with the
    loss the driver logs."""
    path, pairs = tiny_ckpt
    script, events = tmp_path / "hooked_worker.py", tmp_path / "events"
    script.write_text(HOOKED_WORKER)
    events.mkdir()
    monkeypatch.setattr(deepspeed_trainer, "launch_command", lambda tcfg, work, alloc=None: [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
        str(script), str(work), str(events)])
    tcfg = ds_trainer(zero_stage=2, num_processes=2, **{**TRAIN, "epochs": 1.0})
    cfg = dataclasses.replace(make_cfg(), trainer=tcfg, cache_dir=str(TEST_CACHE))
    _, logged = run(deepspeed_trainer.train, cfg, path, pairs, tmp_path / "out")
    assert [s for s, _ in logged] == [101, 102, 103]
    for rank in (0, 1):
        seen = [json.loads(line) for line in (events / f"rank{rank}.jsonl").read_text().splitlines()]
        assert seen[:2] == [["start"], ["end"]]
        assert seen[2:] == [[s - 100, m["train/loss"]] for s, m in logged], rank


@pytest.mark.slow
def test_killed_zero3_stage_resumes_from_its_sharded_step_checkpoint(tiny_ckpt, torch_run, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    """Rank 0 dies after step 3 (global 103); DeepSpeed's own checkpoint of step 2 (every rank's
    ZeRO-3 partition) is loaded by the rerun, whose steps 3-6 follow the uninterrupted curve."""
    path, pairs = tiny_ckpt
    ref_info, ref_logged, ref_out = torch_run
    tcfg = ds_trainer(zero_stage=3, num_processes=2, save_every_steps=2, **TRAIN)
    cfg = dataclasses.replace(make_cfg(), trainer=tcfg, cache_dir=str(TEST_CACHE))
    monkeypatch.setenv("IRPO_KILL_AT_TRAIN_STEP", "103")
    with pytest.raises(RuntimeError, match="the workers failed"):
        run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)
    assert (tmp_path / "resume/committed").read_text() == "step2"
    assert [p.name for p in (tmp_path / "resume").glob("step*")] == ["step2"]  # older ones pruned
    monkeypatch.delenv("IRPO_KILL_AT_TRAIN_STEP")
    info, logged = run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)
    assert [s for s, _ in logged] == list(range(103, 107))
    for (_, got), (_, want) in zip(logged, ref_logged[2:]):
        assert abs(got["train/loss"] - want["train/loss"]) < 1e-5
    assert info["checkpoints"] == ["ckpt-3", "ckpt-6"] and not (tmp_path / "resume").exists()
    for key in ("loss_end", "chosen_delta_end", "rejected_delta_end"):
        assert info[key] == pytest.approx(ref_info[key], abs=1e-4), key
    model, _ = load_model(tmp_path / "ckpt-6")
    ref_model, _ = load_model(ref_out / "ckpt-6")
    for (name, w), (_, ref_w) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_sigterm_saves_a_sharded_checkpoint_and_the_rerun_goes_on(tiny_ckpt, torch_run, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """SIGTERM to rank 0 (as torchrun passes on the driver's own stop) during step 3, with no
    periodic checkpoints: every rank finishes the step, they save together and stop (exit
    75); the rerun goes on after that step and ends as the uninterrupted stage."""
    path, pairs = tiny_ckpt
    ref_info, ref_logged, ref_out = torch_run
    tcfg = ds_trainer(zero_stage=3, num_processes=2, save_every_min=None, **TRAIN)
    cfg = dataclasses.replace(make_cfg(), trainer=tcfg, cache_dir=str(TEST_CACHE))
    monkeypatch.setenv("IRPO_KILL_AT_TRAIN_STEP", "103:TERM")
    with pytest.raises(RuntimeError, match="the workers failed"):
        run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)
    monkeypatch.delenv("IRPO_KILL_AT_TRAIN_STEP")
    saved = int((tmp_path / "resume/committed").read_text().removeprefix("step"))
    assert saved == 3  # rank 1 got no signal: it stopped because rank 0 did
    info, logged = run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)
    assert [s for s, _ in logged] == list(range(101 + saved, 107))
    for (_, got), (_, want) in zip(logged, ref_logged[saved:]):
        assert abs(got["train/loss"] - want["train/loss"]) < 1e-5
    assert info["checkpoints"] == ["ckpt-3", "ckpt-6"]
    model, _ = load_model(tmp_path / "ckpt-6")
    ref_model, _ = load_model(ref_out / "ckpt-6")
    for (name, w), (_, ref_w) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_same_loss_curve_as_torch_and_checkpoint_samples(stage, tiny_ckpt, torch_run, tmp_path):  # noqa: F811
    """ZeRO-2 also takes half the reference log-probs as if from the sampler (equal to the
    recomputed ones), as tests/test_reference.py does for the torch trainer: the sharded
    reference pass then scores pairs, single responses and the check's pairs."""
    path, pairs = tiny_ckpt
    if stage == 2:  # pairs i % 3 == 2 know both, == 1 the rejected only, == 0 neither
        pairs = with_refs(pairs, recomputed_refs(path, pairs),
                          lambda i, side: i % 3 == 2 or (i % 3 == 1 and side == 1))
    ref_info, ref_logged, ref_out = torch_run
    tcfg = ds_trainer(zero_stage=stage, num_processes=2, **TRAIN)
    cfg = dataclasses.replace(make_cfg(), trainer=tcfg, cache_dir=str(TEST_CACHE))
    info, logged = run(deepspeed_trainer.train, cfg, path, pairs, tmp_path)

    assert [s for s, _ in logged] == [s for s, _ in ref_logged] == list(range(101, 107))
    diffs = {k: max(abs(a[k] - b[k]) for (_, a), (_, b) in zip(logged, ref_logged)) for k in SMOOTH}
    print(f"ZeRO-{stage} vs torch, max abs diff per step:", json.dumps(diffs))
    assert diffs["train/loss"] < LOSS_TOL, diffs
    assert all(d < 1e-4 for d in diffs.values()), diffs  # log-probs are sums over ~50 tokens
    assert ref_logged[-1][1]["train/loss"] < ref_logged[0][1]["train/loss"] - 0.3  # it did train
    assert info["world_size"] == 2 and info["checkpoints"] == ref_info["checkpoints"] == ["ckpt-3", "ckpt-6"]
    assert info.keys() - {"world_size"} == ref_info.keys()  # the same stage summary
    from_sampler = 24 if stage == 2 else 0
    assert (info["ref_rows_from_sampler"], info["ref_rows_computed"]) == (from_sampler, 48 - from_sampler)
    if stage == 2:
        assert info["ref_check_pairs"] == 8 and info["ref_logprob_check_max_abs_diff"] < 1e-4
    for key in ("loss_end", "chosen_delta_end", "rejected_delta_end"):
        assert info[key] == pytest.approx(ref_info[key], abs=1e-4), key
    ds_config = json.loads((tmp_path / "deepspeed/ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage

    model, tok = load_model(tmp_path / "ckpt-6")  # a full HF checkpoint, still float32
    ref_model, _ = load_model(ref_out / "ckpt-6")
    assert model.dtype == torch.float32 and model.num_parameters() == ref_model.num_parameters()
    for (name, w), (_, ref_w) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-5, msg=name)
    toks, _ = tokenize_examples(tok, pairs[:4], 256)
    logps, _ = batch_logprobs(model, pair_batch(toks, tok.pad_token_id))
    ref_logps, _ = batch_logprobs(ref_model, pair_batch(toks, tok.pad_token_id))
    torch.testing.assert_close(logps, ref_logps, rtol=0, atol=1e-3)
    sampler = HFSampler(str(tmp_path / "ckpt-6"), SamplerConfig(name="hf", batch_size=4))
    gens = sampler.generate([p["prompt"] for p in pairs[:4]], n=2, temperature=1.0,
                            max_new_tokens=12, seed=0)
    sampler.close()
    assert [len(g) for g in gens] == [2] * 4 and all(s.num_tokens > 0 for g in gens for s in g)


@pytest.mark.slow
def test_one_iteration_of_the_loop_with_deepspeed(tmp_path):
    """python -m irpo.main trainer=deepspeed (reduced sizes): ZeRO-3 over 2 processes, MLflow metrics."""
    run_main(["experiment=smoke", "trainer=deepspeed", "iterations=1"], tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    done = json.loads((run_dir / "iter1/train/DONE").read_text())
    assert done["world_size"] == 2 and done["steps"] >= 1 and done["selected"] == f"ckpt-{done['steps']}"
    model = run_dir / "iter1/train/model"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model / f).exists(), f
    assert (run_dir / "iter1/eval/DONE").exists()
    ds_config = json.loads((run_dir / "iter1/train/deepspeed/ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["train_micro_batch_size_per_gpu"] == 4
    con = sqlite3.connect(tmp_path / "mlflow.db")
    steps = sorted(s for (s,) in con.execute("select step from metrics where key='train/loss'"))
    assert steps == list(range(1, done["steps"] + 1))
