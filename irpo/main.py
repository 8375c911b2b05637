"""Entry point: ``python -m irpo.main [overrides]`` (Hydra app over conf/).

Composes the config, converts it to the typed schemas of irpo.config (a
misspelt key or wrong type fails here, before anything runs), checks the
cross-field rules, and runs or resumes the experiment. With ``-m`` every sweep
point is one experiment, e.g.

    python -m irpo.main -m method=rpo,dpo beta=0.05,0.1,0.5

Returns the final test accuracy, so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import hydra
from omegaconf import DictConfig

from irpo.config import ConfigError, register_configs, to_config
from irpo.config_rules import validate

log = logging.getLogger("irpo")
register_configs()


def _match_threads_to_allocation() -> None:
    """Inside a SLURM job use the CPUs it was given, not every core of the node:
    oversubscribed OpenMP threads spin and slow CPU work down by an order of magnitude."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


def _finished_job_ignores_the_time_limit_warning() -> None:
    """In a submitit job whose run is complete, ignore SLURM's time-limit warning from now on.

    The last attempt of a re-queued job can finish inside the warning window (up to
    signal_delay_s + 30 s before the limit). A warning that arrives after the result is
    written would otherwise re-queue a finished job, or, late in interpreter shutdown where
    Python restores the default action, kill the process: SLURM records the job FAILED
    although its work is done. One job per process under submitit, so nothing else is lost.
    """
    if "SUBMITIT_FOLDER" in os.environ and threading.current_thread() is threading.main_thread():
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # submitit's signal
        signal.signal(getattr(signal, name, signal.SIGUSR2), signal.SIG_IGN)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float:
    from irpo.driver import StageError, run  # heavy imports after composition succeeded
    from irpo.tracking import TrackingUnavailable

    _match_threads_to_allocation()
    try:
        cfg = to_config(raw)
        validate(cfg)
        accuracy = run(cfg, raw)["final_test_accuracy"]
    except (ConfigError, StageError, TrackingUnavailable) as e:
        log.error("%s", e)
        sys.exit(f"error: {e}")
    except Exception:
        # In a SLURM job Hydra hands the exception back to the submitting process; the
        # job's own log must say why the run stopped too.
        log.exception("the run failed")
        raise
    _finished_job_ignores_the_time_limit_warning()
    return accuracy


if __name__ == "__main__":
    main()
