"""Step checkpoints of a training stage, so a killed or pre-empted stage resumes inside itself.

``trainer=torch`` saves, every ``trainer.save_every_steps`` steps and/or every
``trainer.save_every_min`` minutes of training, everything the steps after it
depend on: model weights, AdamW and schedule states, the RNG state, the global
step, the per-step history (for the stage summary), the reference log-probs
(computed from M(t-1), which no longer exists in the model once it trains) and
the names of the checkpoints already saved. It goes to
``<stage>.tmp/resume/state.pt``: written to a temporary file and renamed over
the previous one, so only the last complete state is kept and a half-written one
is never loaded. A rerun of the stage keeps its ``.tmp`` folder, loads the state
and goes on at the next step of the same batch order, so on the CPU the final
model is bitwise that of an uninterrupted stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
STATE_FILE = "state.pt"


class StopOnSignal:
    """SIGTERM, SIGUSR2 (SLURM's warning before a time limit, submitit's requeue) and SIGINT
    while training: finish the step, save a step checkpoint, then act on the signal as
    before (submitit re-queues the job; SIGTERM ends the process; SIGINT raises
    KeyboardInterrupt). A second signal acts at once (Ctrl-C twice stops at once).

    Installed only in the main thread (Python delivers signals there); elsewhere inert.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.act(signum)  # the second one: no waiting for the step to end
            return
        self.received = signum
        log.warning("%s: saving a step checkpoint at the end of this step, then stopping",
                    signal.Signals(signum).name)

    def act(self, signum: int | None = None) -> None:
        """Hand the signal to whatever handled it before (called once the state is saved).

        A handler that returns (submitit lets SIGTERM pass: SLURM sends it before a kill
        that SIGUSR2 has already handled) or an ignored signal lets the work go on.
        """
        signum = signum or self.received
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, None)  # submitit: requeue and exit; SIGINT: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            self.__exit__()
            os.kill(os.getpid(), signum)  # the default action: the process ends
        self.received = None


class StepSaver:
    """Decides when a step checkpoint is due: every N steps and/or every M minutes."""

    def __init__(self, every_steps: int | None, every_min: float | None):
        self.every_steps, self.every_s = every_steps, (every_min * 60 if every_min else None)
        self.last = time.monotonic()

    def due(self, step: int, steps: int) -> bool:
        if step == steps:  # the stage ends here: its outputs are what a rerun finds
            return False
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        by_time = self.every_s is not None and time.monotonic() - self.last >= self.every_s
        return by_steps or by_time

    def saved(self) -> None:
        self.last = time.monotonic()


def save_state(out_dir: Path, step: int, model, optimizer, scheduler, history: list[dict],
               checkpoints: list[Path], refs, ref_info: dict) -> float:
    """Write the resume state after ``step`` atomically; returns the seconds it took."""
    start = time.perf_counter()
    folder = Path(out_dir) / RESUME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history, "checkpoints": [p.name for p in checkpoints],
        "refs": tuple(r.cpu() for r in refs) if refs is not None else None, "ref_info": ref_info,
    }
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return time.perf_counter() - start


def load_state(out_dir: Path) -> dict | None:
    """The last complete resume state of a stage's ``.tmp`` folder, or None.

    Checkpoint folders the state does not list (one being written when the stage was
    killed) are removed: they will be saved again at their step.
    """
    path = Path(out_dir) / RESUME_DIR / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for ck in Path(out_dir).glob("ckpt-*"):
        if ck.name not in state["checkpoints"]:
            shutil.rmtree(ck)
    log.info("resuming training after step %d (%s)", state["step"], path)
    return state


def restore(state: dict, model, optimizer, scheduler) -> None:
    """Put the saved weights, optimizer, schedule and RNG states back."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def discard(out_dir: Path) -> None:
    """The stage is complete: its resume state is no longer needed."""
    shutil.rmtree(Path(out_dir) / RESUME_DIR, ignore_errors=True)


# ------------------------------------------------------------------ trainer=deepspeed
# DeepSpeed's own sharded checkpoints (every rank writes its ZeRO partition). DeepSpeed
# writes its ``latest`` file before the other ranks' partitions are known to be complete,
# so a tag counts only once ``committed`` names it, written by rank 0 after the barrier
# that ends save_checkpoint; older tags are then removed.
COMMITTED = "committed"


STOPPED_EXIT = 75  # a worker's exit status after a signal: its step checkpoint is saved


def ds_decide(saver: StepSaver, step: int, steps: int, device, signalled: bool) -> tuple[bool, bool]:
    """(save now, stop after saving), the same on every rank: rank 0 decides the periodic
    saves (a time-based decision must not differ between ranks), and a signal that reached
    any rank stops them all."""
    import torch.distributed as dist

    due = dist.get_rank() == 0 and saver.due(step, steps)
    flags = torch.tensor([float(due), float(signalled)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop = bool(flags[1].item())
    return bool(flags[0].item()) or stop, stop


def ds_save_state(engine, out_dir: Path, step: int, client_state: dict) -> None:
    import torch.distributed as dist

    folder = Path(out_dir) / RESUME_DIR
    tag = f"step{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    if dist.get_rank() == 0:
        tmp = folder / (COMMITTED + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, folder / COMMITTED)
        for old in folder.glob("step*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def ds_load_state(engine, out_dir: Path) -> dict | None:
    """The client state of the last committed DeepSpeed checkpoint, loaded into ``engine``."""
    import torch.distributed as dist

    folder = Path(out_dir) / RESUME_DIR
    marker = folder / COMMITTED
    if not marker.exists():
        return None
    tag = marker.read_text().strip()
    _, state = engine.load_checkpoint(str(folder), tag=tag)
    if dist.get_rank() == 0:
        for ck in Path(out_dir).glob("ckpt-*"):
            if ck.name not in state["checkpoints"]:
                shutil.rmtree(ck)
    dist.barrier()
    log.info("resuming training after step %d (%s)", state["step"], folder / tag)
    return state
