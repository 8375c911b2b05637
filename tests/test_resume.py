"""A training stage resumes inside itself: step checkpoints of trainer=torch.

An attempt is stopped after a step (an exception out of the metrics callback, as a kill
would stop it) and the stage is run again on the same folder; the final weights, the
metrics of every step and the summary equal those of an uninterrupted stage, bitwise.
The end-to-end kill -9 of a real run is in test_faults.py.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_cfg, tiny_ckpt  # noqa: F401 - the fixture is used by name

from irpo.record import StepLog, step_records
from irpo.training.resume import STATE_FILE, StepSaver, load_state
from irpo.training.torch_trainer import train


class Stop(Exception):
    pass


def attempt(cfg, path, pairs, out, stop_at=None):
    logged = []

    def log(metrics, step):
        logged.append((step, metrics))
        if step == stop_at:
            raise Stop

    try:
        info = train(cfg, path, pairs, out, log, 0, 7)
    except Stop:
        return None, logged
    return info, logged


@pytest.mark.parametrize("stop_at", [3, 6])
def test_stopped_stage_resumes_to_the_uninterrupted_result(tiny_ckpt, tmp_path, stop_at):
    path, pairs = tiny_ckpt  # 24 pairs, batch 4 -> 12 steps (2 epochs: 12 x 4 / 24)
    cfg = make_cfg(batch_size=4, epochs=2.0, checkpoints=3, save_every_steps=2)
    want, want_log = attempt(cfg, path, pairs, tmp_path / "clean")
    out = tmp_path / "stopped"
    assert attempt(cfg, path, pairs, out, stop_at=stop_at)[0] is None
    state = torch.load(out / "resume" / STATE_FILE, weights_only=False)
    # The last even step before the stop: a step is logged before its checkpoint is saved.
    assert state["step"] == 2 * ((stop_at - 1) // 2)
    got, got_log = attempt(cfg, path, pairs, out)
    assert [s for s, _ in got_log] == list(range(state["step"] + 1, 13))
    assert got_log == want_log[state["step"]:]  # the same values, to the bit
    assert got == want
    for ck in want["checkpoints"]:
        a, b = load_file(tmp_path / "clean" / ck / "model.safetensors"), load_file(out / ck / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ck
    assert not (out / "resume").exists()


def test_half_written_state_and_checkpoints_are_not_loaded(tmp_path):
    assert load_state(tmp_path) is None
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / (STATE_FILE + ".tmp")).write_bytes(b"half")  # killed mid-write
    assert load_state(tmp_path) is None
    torch.save({"step": 4, "checkpoints": ["ckpt-2"]}, tmp_path / "resume" / STATE_FILE)
    for name in ("ckpt-2", "ckpt-4"):  # ckpt-4 was being written when the stage was killed
        (tmp_path / name).mkdir()
    assert load_state(tmp_path)["step"] == 4
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-2"]


def test_saver_by_steps_and_by_time(monkeypatch):
    saver = StepSaver(every_steps=2, every_min=None)
    assert [s for s in range(1, 8) if saver.due(s, 7)] == [2, 4, 6]
    assert not saver.due(6, 6)  # the last step: the stage's own outputs follow
    clock = iter([0.0, 59.0, 61.0, 61.0, 100.0])
    monkeypatch.setattr("irpo.training.resume.time.monotonic", lambda: next(clock))
    saver = StepSaver(every_steps=None, every_min=1.0)  # reads the clock once (0.0)
    assert not saver.due(1, 10) and saver.due(2, 10)  # 59 s, then 61 s since the start
    saver.saved()  # at 61 s
    assert not saver.due(3, 10)  # 39 s since the save


def test_redone_steps_replace_their_record(tmp_path):
    log = StepLog(tmp_path)
    for step in range(1, 5):
        log.append({"train/loss": float(step)}, step)
    resumed = StepLog(tmp_path)  # the stage restarts after step 2
    resumed.append({"train/loss": 30.0}, 3)
    assert [(m.step, m.value) for m in step_records(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


class Requeued(Exception):
    """What submitit's SIGUSR2 handler does in effect: re-queue the job and leave."""


def test_signal_saves_after_the_step_then_hands_over(tiny_ckpt, tmp_path):
    """SLURM's warning signal at step 3 of 12 (no periodic checkpoints at all): the step
    finishes, a step checkpoint is saved, the previous handler runs; the rerun goes on
    at step 4 and ends as an uninterrupted stage does."""
    import os
    import signal

    path, pairs = tiny_ckpt
    cfg = make_cfg(batch_size=4, epochs=2.0, save_every_min=None)
    want, want_log = attempt(cfg, path, pairs, tmp_path / "clean")

    def requeue(signum, frame):
        raise Requeued

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        def log(metrics, step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGUSR2)

        with pytest.raises(Requeued):
            train(cfg, path, pairs, tmp_path / "stopped", log, 0, 7)
        assert signal.getsignal(signal.SIGUSR2) is requeue  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    state = torch.load(tmp_path / "stopped/resume" / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    got, got_log = attempt(cfg, path, pairs, tmp_path / "stopped")
    assert got_log == want_log[3:] and got == want


def test_stop_on_signal_hands_over_and_goes_on_if_the_handler_returns():
    import os
    import signal

    from irpo.training.resume import StopOnSignal

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # like submitit's SIGTERM
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received == signal.SIGUSR2 and calls == []  # held until the step ends
            stop.act()
            assert calls == [signal.SIGUSR2] and stop.received is None  # handed over, goes on
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received == signal.SIGUSR2  # still watching
            os.kill(os.getpid(), signal.SIGUSR2)  # a second one acts at once
            assert calls == [signal.SIGUSR2] * 2
        assert signal.getsignal(signal.SIGUSR2) is not None and calls == [signal.SIGUSR2] * 2
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_train_stage_without_a_step_checkpoint_clears_a_killed_attempts_leftovers(tmp_path,
                                                                                  monkeypatch):
    """Killed after the best checkpoint became ``model`` but before DONE: the rerun trains
    again (its step checkpoint was already gone) and must not trip over the old folders."""
    from irpo import driver
    from irpo.rundir import RunDir
    from irpo.tracking import NullTracker

    (tmp_path / "iter1/data").mkdir(parents=True)
    (tmp_path / "iter1/data/train.jsonl").write_text('{"id": "0"}\n')
    out = tmp_path / "iter1/train.tmp"
    for leftover in ("model", "ckpt-9"):
        (out / leftover).mkdir(parents=True)
        (out / leftover / "model.safetensors").write_text("old")

    def fake_train(cfg, init, examples, out_dir, log, offset, seed):
        (out_dir / "ckpt-2").mkdir()
        (out_dir / "ckpt-2" / "model.safetensors").write_text("new")
        return {"checkpoints": ["ckpt-2"], "steps": 2}

    monkeypatch.setattr(driver, "get_trainer", lambda name: fake_train)
    ctx = driver.Context(make_cfg(), None, RunDir(tmp_path), NullTracker(), {})
    driver.stage_train(ctx, 1, tmp_path / "m0", out)
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    assert (out / "model" / "model.safetensors").read_text() == "new"


@contextlib.contextmanager
def requeue_on_usr2():
    """SIGUSR2 raises Requeued, as submitit's handler re-queues and exits."""
    import signal

    def requeue(signum, frame):
        raise Requeued

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize("signal_in_chunk", [0, 2])
def test_a_signal_during_a_chunk_commits_it_then_hands_over(tmp_path, signal_in_chunk):
    """SLURM's warning during chunk k (the last one too): chunk k is committed, then the
    previous handler (submitit's requeue) runs; the rerun reuses what was committed."""
    import os
    import signal

    from irpo.chunks import run_chunks

    calls = []

    def fn(first, part):
        calls.append(first)
        if first == 2 * signal_in_chunk:
            os.kill(os.getpid(), signal.SIGUSR2)
        return [{"i": i} for i in part]

    with requeue_on_usr2(), pytest.raises(Requeued):
        run_chunks(tmp_path, list(range(6)), 2, fn, "iter1/sample")
    assert sorted(p.name for p in (tmp_path / "chunks").glob("*.jsonl")) == [
        f"{k}.jsonl" for k in range(signal_in_chunk + 1)]
    assert run_chunks(tmp_path, list(range(6)), 2, fn, "iter1/sample") == [{"i": i} for i in range(6)]
    assert calls == [0, 2, 4][: signal_in_chunk + 1] + [0, 2, 4][signal_in_chunk + 1:]


def test_a_chunk_failed_by_the_signal_hands_over_rather_than_fails(tmp_path):
    """srun passes SLURM's warning to the nodes' tasks too, which stop, so the chunk's
    call fails: the driver must act on the signal (re-queue), not fail the job."""
    import os
    import signal

    from irpo.chunks import run_chunks

    def fn(first, part):
        if first == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
            raise RuntimeError("srun: task 1 exited on signal 12")
        return [{"i": i} for i in part]

    with requeue_on_usr2(), pytest.raises(Requeued):
        run_chunks(tmp_path, list(range(6)), 2, fn, "iter1/sample")
    assert [p.name for p in (tmp_path / "chunks").glob("*.jsonl")] == ["0.jsonl"]
    with pytest.raises(RuntimeError, match="exited on signal"):  # no signal: the error stands
        run_chunks(tmp_path, list(range(6)), 2,
                   lambda first, part: (_ for _ in ()).throw(RuntimeError("exited on signal")),
                   "iter1/sample")


def test_multi_node_stages_are_one_call_that_each_node_chunks():
    from irpo.chunks import stage_chunk_size
    from irpo.sampling.hf import HFSamplerConfig
    from irpo.sampling.vllm import VLLMSamplerConfig

    assert stage_chunk_size(HFSamplerConfig(name="hf", chunk_size=7), 100) == 7
    assert stage_chunk_size(VLLMSamplerConfig(name="vllm", chunk_size=7), 100) == 7
    assert stage_chunk_size(VLLMSamplerConfig(name="vllm", chunk_size=7, nodes=2), 100) == 100
